"""Entry-point registries: ``lvzoo.estimators``, ``lvzoo.tasks`` and ``lvzoo.models``.

Built-ins are registered through lvzoo's own ``pyproject.toml`` entry points, exactly like a third-party
plugin::

    [project.entry-points."lvzoo.estimators"]
    myest = "my_package.module:MyEstimator"
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class UnknownNameError(LookupError):
    """A registry lookup for a name that no installed package registers."""


class PluginLoadError(ImportError):
    """A registered plugin exists but failed to import."""


def class_path(cls: type[Any]) -> str:
    """``"module:QualName"`` of a class (the form entry points use)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type[Any]:
    """Inverse of :func:`class_path`; ``ImportError`` / ``AttributeError`` / ``TypeError`` (not a class) otherwise."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{path!r} is not a class")
    return obj


class Registry(Generic[T]):
    """Lazy view of one entry-point group. Nothing is imported until :meth:`load`/:meth:`load_all`."""

    def __init__(self, group: str, kind: str) -> None:
        self.group = group
        self.kind = kind

    def _entry_points(self) -> dict[str, EntryPoint]:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=self.group):
            found.setdefault(ep.name, ep)
        return found

    def names(self) -> list[str]:
        """Sorted registered names (imports nothing)."""
        return sorted(self._entry_points())

    def load(self, name: str) -> T:
        """The object registered as ``name``; a clear error lists the available names otherwise."""
        eps = self._entry_points()
        if name not in eps:
            available = ", ".join(sorted(eps)) or "(none installed)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available {self.kind}s: {available}")
        try:
            return cast(T, eps[name].load())
        except Exception as exc:  # a broken plugin must not look like a missing one
            raise PluginLoadError(
                f"{self.kind} {name!r} ({eps[name].value}) failed to import: {type(exc).__name__}: {exc}"
            ) from exc

    def name_of(self, cls: type[Any]) -> str:
        """The name under which ``cls`` is registered in this group (imports nothing), else the class name."""
        target = class_path(cls)
        for name, entry in self._entry_points().items():
            if entry.value.replace(" ", "") == target:
                return name
        return cls.__name__

    def load_all(self) -> tuple[dict[str, T], dict[str, str]]:
        """``(loaded, failures)``: every plugin that imports, and ``name -> cause`` for those that do not.

        Each failure is also reported with :func:`warnings.warn`; the others are unaffected.
        """
        loaded: dict[str, T] = {}
        failures: dict[str, str] = {}
        for name in self.names():
            try:
                loaded[name] = self.load(name)
            except PluginLoadError as exc:
                failures[name] = str(exc)
                warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
        return loaded, failures


estimators: Registry[Any] = Registry("lvzoo.estimators", "estimator")
tasks: Registry[Any] = Registry("lvzoo.tasks", "task")
models: Registry[Any] = Registry("lvzoo.models", "model")

__all__ = [
    "PluginLoadError",
    "Registry",
    "UnknownNameError",
    "class_path",
    "estimators",
    "import_class",
    "models",
    "tasks",
]
