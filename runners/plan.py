"""The run plan: names resolved to classes, the resolved configs and the run's seed, epochs, device and data.

:class:`RunPlan` has one serialization, :meth:`RunPlan.to_dict` / :meth:`RunPlan.from_dict`. Checkpoints hold
its dict at their top level, ``config.json`` is its dict as JSON, the MLflow params are its flattened configs
(:meth:`RunPlan.to_params`) and ``runner reproduce`` reports a selection of those params. Every user error is a
one-line :class:`~lvzoo.runners.config.ConfigError`.
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import attrs
import torch

from lvzoo import registry
from lvzoo.estimators.base import Estimator
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.config import (
    ESTIMATOR_PREFIX,
    TASK_PREFIX,
    ConfigError,
    config_to_dict,
    field_types,
    one_line,
    resolve_configs,
)
from lvzoo.tasks.base import Task, TaskConfig

TaskSpec = str | type[Task[Any]] | Task[Any]
EstimatorSpec = str | type[Estimator[Any]]


@attrs.frozen
class RunPlan:
    """Everything needed to build a run, resolved and validated."""

    task_cls: type[Task[Any]]
    task_name: str
    task_config: TaskConfig
    estimator_cls: type[Estimator[Any]]
    estimator_name: str
    estimator_config: Any
    data_dir: Path | None
    device: torch.device
    seed: int
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        """``{"task": {"name", "class", "config"}, "estimator": {...}, "seed", "epochs", "data_dir", "device"}``:
        plain values (config tuples stay tuples; JSON writes them as lists)."""
        return {
            "task": {
                "name": self.task_name,
                "class": class_path(self.task_cls),
                "config": config_to_dict(self.task_config),
            },
            "estimator": {
                "name": self.estimator_name,
                "class": class_path(self.estimator_cls),
                "config": config_to_dict(self.estimator_config),
            },
            "seed": self.seed,
            "epochs": self.epochs,
            "data_dir": str(self.data_dir) if self.data_dir is not None else None,
            "device": str(self.device),
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        task_cls: type[Task[Any]] | None = None,
        estimator_cls: type[Estimator[Any]] | None = None,
    ) -> RunPlan:
        """Inverse of :meth:`to_dict` (other keys of ``data`` are ignored; a missing ``device`` is ``cpu``).

        The classes are the given ones, else the stored registered names, else the stored import paths.
        """
        task_cls = task_cls or _stored_class(data["task"], registry.tasks)
        estimator_cls = estimator_cls or _stored_class(data["estimator"], registry.estimators)
        try:
            task_config = _config_from_dict(task_cls.config_class, data["task"]["config"])
            estimator_config = _config_from_dict(estimator_cls.config_class, data["estimator"]["config"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's config no longer validates: {one_line(str(exc))}") from None
        stored_dir = data["data_dir"]
        return cls(
            task_cls=task_cls,
            task_name=str(data["task"]["name"]),
            task_config=task_config,
            estimator_cls=estimator_cls,
            estimator_name=str(data["estimator"]["name"]),
            estimator_config=estimator_config,
            data_dir=Path(stored_dir) if stored_dir else None,
            device=device_of(data.get("device", "cpu")),
            seed=int(data["seed"]),
            epochs=int(data["epochs"]),
        )

    def to_params(self) -> dict[str, str]:
        """MLflow params, flattened from :meth:`to_dict`: ``task.<field>``, ``estimator.<field>`` and ``seed``."""
        data = self.to_dict()
        params = {TASK_PREFIX + key: str(value) for key, value in data["task"]["config"].items()}
        params.update({ESTIMATOR_PREFIX + key: str(value) for key, value in data["estimator"]["config"].items()})
        params["seed"] = str(data["seed"])
        return params


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list | tuple) else value


def _config_from_dict(config_class: type[Any], values: Mapping[str, Any]) -> Any:
    """``config_class(**values)`` with JSON lists turned back into tuples for tuple-typed fields."""
    types = field_types(config_class)
    return config_class(
        **{
            key: _tuples(value) if typing.get_origin(types.get(key)) is tuple else value
            for key, value in values.items()
        }
    )


# --- names and classes ------------------------------------------------------------------------------------------


def class_path(cls: type[Any]) -> str:
    """``"module:QualName"`` of a class (the form entry points use)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type[Any]:
    """Inverse of :func:`class_path`."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ConfigError(f"{path!r} is not a class")
    return obj


def registered_name(group: str, cls: type[Any]) -> str:
    """The entry-point name under which ``cls`` is registered in ``group``, else the class name."""
    target = class_path(cls)
    for entry in entry_points(group=group):
        if entry.value.replace(" ", "") == target:
            return entry.name
    return cls.__name__


def _load_plugin(reg: registry.Registry[Any], name: str) -> Any:
    try:
        return reg.load(name)
    except (registry.UnknownNameError, registry.PluginLoadError) as exc:
        raise ConfigError(one_line(str(exc))) from None


def resolve_task(task: TaskSpec) -> tuple[type[Task[Any]], str]:
    """``(class, registered name)`` of a task name, class or instance."""
    if isinstance(task, str):
        cls = _load_plugin(registry.tasks, task)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"task {task!r} does not name a Task subclass")
        return cls, task
    task_cls = type(task) if isinstance(task, Task) else task
    return task_cls, registered_name(registry.tasks.group, task_cls)


def resolve_estimator(estimator: EstimatorSpec) -> tuple[type[Estimator[Any]], str]:
    """``(class, registered name)`` of an estimator name or class."""
    if isinstance(estimator, str):
        cls = _load_plugin(registry.estimators, estimator)
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise ConfigError(f"estimator {estimator!r} does not name an Estimator subclass")
        return cls, estimator
    return estimator, registered_name(registry.estimators.group, estimator)


def _stored_class(entry: Mapping[str, Any], reg: registry.Registry[Any]) -> type[Any]:
    """The class of a stored ``{"name", "class"}`` entry: its registered name first, else its import path."""
    if entry["name"] in reg.names():
        return _load_plugin(reg, entry["name"])  # type: ignore[no-any-return]
    try:
        return import_class(entry["class"])
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {entry['class']!r} for {entry['name']!r}: {one_line(str(exc))}") from None


def device_of(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing bad names and CUDA on a machine without it."""
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {device!r}: {one_line(str(exc))}; accepted: cpu, cuda, cuda:N") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; accepted: cpu")
    return torch_device


# --- planning ---------------------------------------------------------------------------------------------------


def plan_run(
    task: TaskSpec,
    estimator: EstimatorSpec,
    overrides: Mapping[str, Any],
    *,
    epochs: int | None,
    seed: int,
    device: str | torch.device,
    data_dir: Path | None,
) -> RunPlan:
    """Resolve and validate a fresh run: field defaults, the task's paper settings, then ``overrides``.

    A task instance's non-default config values count as the user's own, and its ``data_dir`` is the default.
    """
    task_cls, task_name = resolve_task(task)
    estimator_cls, estimator_name = resolve_estimator(estimator)
    user_overrides = dict(overrides)
    if isinstance(task, Task):
        defaults = config_to_dict(type(task.config)())
        base = {
            k: v
            for k, v in config_to_dict(task.config).items()
            if v != defaults[k] and k not in user_overrides and f"{TASK_PREFIX}{k}" not in user_overrides
        }
        user_overrides = {**{f"{TASK_PREFIX}{k}": v for k, v in base.items()}, **user_overrides}
        data_dir = data_dir if data_dir is not None else task.data_dir
    torch_device = device_of(device)
    task_config, estimator_config = resolve_configs(
        task_cls, estimator_name, estimator_cls.config_class, user_overrides
    )
    run_epochs = task_cls.default_epochs if epochs is None else epochs
    if isinstance(run_epochs, bool) or not isinstance(run_epochs, int) or run_epochs < 1:
        raise ConfigError(f"epochs must be a positive int, got {run_epochs!r}")
    return RunPlan(
        task_cls=task_cls,
        task_name=task_name,
        task_config=task_config,
        estimator_cls=estimator_cls,
        estimator_name=estimator_name,
        estimator_config=estimator_config,
        data_dir=data_dir,
        device=torch_device,
        seed=seed,
        epochs=run_epochs,
    )


def reusable_instance(task: TaskSpec, plan: RunPlan) -> Task[Any] | None:
    """The given task instance when it was built with exactly the plan's config, data dir and device."""
    if isinstance(task, Task) and (task.config, task.data_dir, task.device) == (
        plan.task_config,
        plan.data_dir,
        plan.device,
    ):
        return task
    return None


def plan_from_checkpoint(
    state: Mapping[str, Any],
    task: TaskSpec | None,
    estimator: EstimatorSpec | None,
    *,
    epochs: int | None,
    device: str | torch.device,
    data_dir: Path | None,
) -> RunPlan:
    """The plan a checkpoint was trained with, on ``device``, up to ``epochs`` (default: the stored epochs) and
    with ``data_dir`` when given. A given task or estimator must be the stored one."""
    ckpt.check_format(state)
    task_cls = resolve_task(task)[0] if task is not None else None
    estimator_cls = resolve_estimator(estimator)[0] if estimator is not None else None
    for what, cls in (("task", task_cls), ("estimator", estimator_cls)):
        if cls is not None and class_path(cls) != state[what]["class"]:
            raise ConfigError(
                f"the checkpoint was trained with {what} {state[what]['name']!r} ({state[what]['class']}), "
                f"not {class_path(cls)}"
            )
    stored = {**state, "device": device, "epochs": state["epochs"] if epochs is None else epochs}
    if data_dir is not None:
        stored["data_dir"] = str(data_dir)
    return RunPlan.from_dict(stored, task_cls, estimator_cls)
