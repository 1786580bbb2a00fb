"""The run plan: ``--set`` overrides parsed and routed, names resolved to classes, configs resolved (field defaults,
then the task's paper settings, then the user's values) and validated, plus the run's seed, epochs, device and data.

A run has two frozen attrs configs: the task's (``task.config_class``) and the estimator's
(``estimator.config_class``). User overrides are given as ``key=value`` strings (or already typed values from the
Python API); a bare ``key`` is looked up in both configs, ``task.key`` / ``estimator.key`` pick one. String values
are parsed by the field's annotated type (``int``, ``float``, ``bool``, ``str``, ``None`` unions, ``Literal[...]``,
``tuple[...]``).

:class:`RunPlan` has one serialization, :meth:`RunPlan.to_dict` / :meth:`RunPlan.from_dict`. Checkpoints hold its
dict at their top level, ``config.json`` is its dict as JSON, the MLflow params are its flattened configs
(:meth:`RunPlan.to_params`) and ``runner reproduce`` reports a selection of those params. Every user error is a
one-line :class:`ConfigError` that names the bad key or value and what would have been accepted.
"""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from lvzoo import registry
from lvzoo.estimators.base import Estimator
from lvzoo.runners.errors import ConfigError as ConfigError
from lvzoo.runners.errors import one_line as one_line
from lvzoo.tasks.base import Task, TaskConfig, resolve_config

# --- overrides and configs ------------------------------------------------------------------------------------

TASK_PREFIX = "task."
ESTIMATOR_PREFIX = "estimator."
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def field_types(config_class: type[Any]) -> dict[str, Any]:
    """Field name -> annotated type of an attrs class (the annotation string if it cannot be resolved)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    return {field.name: hints.get(field.name, field.type) for field in attrs.fields(config_class)}


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse the string ``text`` as a value of type ``annotation`` (used for the ``--set`` value of ``key``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for member in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, member, key)
            except ConfigError:
                continue
        raise ConfigError(f"bad value for {key}: {text!r} is not a {_type_name(annotation)}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        accepted = ", ".join(repr(c) for c in args)
        raise ConfigError(f"bad value for {key}: {text!r}; accepted values: {accepted}")
    if origin is tuple:
        body = text.strip()
        if body[:1] in "([" and body[-1:] in ")]":
            body = body[1:-1]
        items = [part.strip() for part in body.split(",") if part.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(item, args[0], key) for item in items)
        if len(items) != len(args):
            raise ConfigError(f"bad value for {key}: {text!r} needs {len(args)} comma-separated items")
        return tuple(parse_value(item, member, key) for item, member in zip(items, args, strict=True))
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"bad value for {key}: {text!r} is not a bool (use true/false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"bad value for {key}: {text!r} is not an int") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"bad value for {key}: {text!r} is not a float") from None
    if annotation is str:
        return text
    try:  # unknown or unresolved annotation: accept a Python literal, else keep the string
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _route(
    overrides: Mapping[str, Any], task_fields: Mapping[str, Any], estimator_fields: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split user overrides into (task values, estimator values), parsing strings by field type."""
    accepted = [TASK_PREFIX + name for name in task_fields] + [ESTIMATOR_PREFIX + name for name in estimator_fields]
    task_values: dict[str, Any] = {}
    estimator_values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key.startswith(TASK_PREFIX) and key[len(TASK_PREFIX) :] in task_fields:
            target, fields, name = task_values, task_fields, key[len(TASK_PREFIX) :]
        elif key.startswith(ESTIMATOR_PREFIX) and key[len(ESTIMATOR_PREFIX) :] in estimator_fields:
            target, fields, name = estimator_values, estimator_fields, key[len(ESTIMATOR_PREFIX) :]
        elif key in task_fields and key in estimator_fields:
            raise ConfigError(f"ambiguous key {key!r}: use {TASK_PREFIX}{key} or {ESTIMATOR_PREFIX}{key}")
        elif key in task_fields:
            target, fields, name = task_values, task_fields, key
        elif key in estimator_fields:
            target, fields, name = estimator_values, estimator_fields, key
        else:
            raise ConfigError(f"unknown key {key!r}; accepted keys: {', '.join(accepted)}")
        prefix = TASK_PREFIX if target is task_values else ESTIMATOR_PREFIX
        target[name] = parse_value(value, fields[name], prefix + name) if isinstance(value, str) else value
    return task_values, estimator_values


def _build(config_class: type[Any], values: Mapping[str, Any], what: str) -> Any:
    """Instantiate an attrs config, turning validator errors into a one-line :class:`ConfigError`."""
    try:
        return config_class(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid {what} config: {one_line(str(exc))}") from None


def split_overrides(
    overrides: Mapping[str, Any], task_config_class: type[TaskConfig], estimator_config_class: type[Any]
) -> tuple[TaskConfig, dict[str, Any]]:
    """Validated task config from the user values, and the user's estimator values (not yet merged)."""
    task_values, estimator_values = _route(
        overrides, field_types(task_config_class), field_types(estimator_config_class)
    )
    task_config: TaskConfig = _build(task_config_class, task_values, "task")
    return task_config, estimator_values


def resolve_configs(
    task_cls: type[Task[Any]], estimator_name: str, estimator_config_class: type[Any], overrides: Mapping[str, Any]
) -> tuple[TaskConfig, Any]:
    """The task config and estimator config of a run: field defaults, then the task's paper settings for
    ``estimator_name`` (:func:`lvzoo.tasks.base.resolve_config`), then the user's ``overrides`` (``--set``)."""
    task_values, estimator_values = _route(
        overrides, field_types(task_cls.config_class), field_types(estimator_config_class)
    )
    try:
        task_config, paper_estimator = resolve_config(task_cls, estimator_name, task_values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid task config: {one_line(str(exc))}") from None
    known = {field.name for field in attrs.fields(estimator_config_class)}
    unknown = sorted(set(paper_estimator) - known)
    if unknown:
        raise ConfigError(
            f"task settings set unknown estimator keys {unknown}; accepted keys: {', '.join(sorted(known)) or '(none)'}"
        )
    return task_config, _build(estimator_config_class, {**paper_estimator, **estimator_values}, "estimator")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Field values of an attrs config (tuples kept as tuples)."""
    return attrs.asdict(config, recurse=True)


# --- the plan -------------------------------------------------------------------------------------------------

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
        task = (self.task_name, self.task_cls, self.task_config)
        estimator = (self.estimator_name, self.estimator_cls, self.estimator_config)
        return {
            **{
                what: {"name": name, "class": registry.class_path(cls), "config": config_to_dict(config)}
                for what, (name, cls, config) in (("task", task), ("estimator", estimator))
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


# --- names and classes -----------------------------------------------------------------------------------------


def _load_plugin(reg: registry.Registry[Any], name: str) -> Any:
    try:
        return reg.load(name)
    except (registry.UnknownNameError, registry.PluginLoadError) as exc:
        raise ConfigError(one_line(str(exc))) from None


def _resolve(spec: Any, reg: registry.Registry[Any], base: type[Any]) -> tuple[Any, str]:
    """``(class, registered name)`` of a registered name, a class or an instance."""
    if not isinstance(spec, str):
        cls = spec if isinstance(spec, type) else type(spec)
        return cls, reg.name_of(cls)
    cls = _load_plugin(reg, spec)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{reg.kind} {spec!r} does not name a {base.__name__} subclass")
    return cls, spec


def resolve_task(task: TaskSpec) -> tuple[type[Task[Any]], str]:
    """``(class, registered name)`` of a task name, class or instance."""
    return _resolve(task, registry.tasks, Task)


def resolve_estimator(estimator: EstimatorSpec) -> tuple[type[Estimator[Any]], str]:
    """``(class, registered name)`` of an estimator name or class."""
    return _resolve(estimator, registry.estimators, Estimator)


def _stored_class(entry: Mapping[str, Any], reg: registry.Registry[Any]) -> type[Any]:
    """The class of a stored ``{"name", "class"}`` entry: its registered name first, else its import path."""
    if entry["name"] in reg.names():
        return _load_plugin(reg, entry["name"])  # type: ignore[no-any-return]
    try:
        return registry.import_class(entry["class"])
    except (ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(f"cannot import {entry['class']!r} for {entry['name']!r}: {one_line(str(exc))}") from None


def device_of(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` (``"auto"``: CUDA when available, else the CPU), refusing bad names and CUDA on a
    machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {device!r}: {one_line(str(exc))}; accepted: auto, cpu, cuda, cuda:N") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; accepted: auto, cpu")
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
