"""Planning ``runner reproduce``: the rows (paper estimators and variants, or named ones) and every run validated.

Each row is an :class:`Entry`; its ``settings`` are the row's paper hyper-parameters as the report lists them, a
selection of the run plan's MLflow params (:meth:`lvzoo.runners.plan.RunPlan.to_params`). Plugins this process
resolved without an installed entry point are listed so the spawned workers can be handed them.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lvzoo import registry
from lvzoo.estimators.base import EstimatorConfig
from lvzoo.runners.plan import (
    ESTIMATOR_PREFIX,
    TASK_PREFIX,
    ConfigError,
    RunPlan,
    device_of,
    field_types,
    one_line,
    plan_run,
    split_overrides,
)
from lvzoo.tasks.base import Task, TaskConfig

#: The task-config params every row's settings show (under their bare names), before the estimator's.
SETTINGS_TASK_FIELDS = ("lr", "batch_size", "entropy_coef")


@attrs.frozen
class Entry:
    """One table row: ``label`` runs ``estimator`` with the task overrides ``variant`` (plus the user's)."""

    label: str
    estimator: str
    variant: Mapping[str, Any]
    run_overrides: Mapping[str, Any]
    settings: Mapping[str, str]


@attrs.frozen
class Reproduction:
    """A validated reproduction plan (see :func:`plan_reproduction`)."""

    task: str
    paper_epochs: int
    epochs: int
    seeds: tuple[int, ...]
    overrides: Mapping[str, str]
    device: str
    data_dir: Path | None
    entries: tuple[Entry, ...]
    runtime_plugins: tuple[tuple[str, str, str], ...]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"43,44"`` -> ``(43, 44)``; refuses empty lists, non-integers and duplicates."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        seeds = tuple(int(item) for item in items)
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds expects at least one integer, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has duplicates: {text!r}")
    return seeds


def _task_field(key: str, task_fields: Mapping[str, Any]) -> str | None:
    """The task-config field a ``--set`` key addresses (``task.x`` or a bare task field ``x``), else ``None``."""
    name = key[len(TASK_PREFIX) :] if key.startswith(TASK_PREFIX) else key
    return name if name in task_fields else None


def _user_task_config(task_cls: type[Task[Any]], overrides: Mapping[str, str]) -> TaskConfig:
    """The task config of the user's task-level overrides alone (to ask the task for its paper variants)."""
    task_fields = field_types(task_cls.config_class)
    task_values = {key: value for key, value in overrides.items() if _task_field(key, task_fields) is not None}
    config, _ = split_overrides(task_values, task_cls.config_class, EstimatorConfig)
    return config


def _merge_variant(
    overrides: Mapping[str, str], variant: Mapping[str, Any], task_fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The user's overrides with the variant's task overrides on top (the variant defines the row)."""
    merged: dict[str, Any] = {
        key: value for key, value in overrides.items() if _task_field(key, task_fields) not in variant
    }
    merged.update({TASK_PREFIX + key: value for key, value in variant.items()})
    return merged


def _runtime_plugin(group: str, name: str, cls: type[Any]) -> tuple[str, str, str] | None:
    """``(group, name, "module:QualName")`` when no installed entry point registers ``cls`` as ``name``."""
    target = registry.class_path(cls)
    for entry in importlib.metadata.entry_points(group=group, name=name):
        if entry.value.replace(" ", "") == target:
            return None
    return group, name, target


def row_settings(plan: RunPlan) -> dict[str, str]:
    """``lr``, ``batch_size``, ``entropy_coef`` and every ``estimator.<field>`` of the plan's MLflow params."""
    params = plan.to_params()
    settings = {name: params[TASK_PREFIX + name] for name in SETTINGS_TASK_FIELDS}
    settings.update({key: value for key, value in params.items() if key.startswith(ESTIMATOR_PREFIX)})
    return settings


def plan_reproduction(
    task: str,
    estimators: Sequence[str] | None,
    overrides: Mapping[str, str],
    *,
    epochs: int | None,
    seeds: Sequence[int] | None,
    device: str,
    data_dir: Path | None,
) -> Reproduction:
    """Resolve the rows (paper estimators and variants, or the ``estimators`` names/labels) and validate every run.

    Every configuration error is a one-line :class:`ConfigError` raised before anything trains.
    """
    try:
        task_cls = registry.tasks.load(task)
    except (registry.UnknownNameError, registry.PluginLoadError) as exc:
        raise ConfigError(one_line(str(exc))) from None
    if not (isinstance(task_cls, type) and issubclass(task_cls, Task)):
        raise ConfigError(f"task {task!r} does not name a Task subclass")
    variants = task_cls.paper_variants(_user_task_config(task_cls, overrides))
    if estimators is None:
        labels = [*task_cls.paper_estimators, *variants]
        if not labels:
            raise ConfigError(f"task {task!r} declares no paper estimators; pass --estimators a,b,...")
    else:
        labels = list(estimators)
        if not labels:
            raise ConfigError("--estimators needs at least one estimator name or variant label")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--estimators has duplicates: {','.join(labels)}")
    task_fields = field_types(task_cls.config_class)
    run_epochs = task_cls.default_epochs if epochs is None else epochs
    entries: list[Entry] = []
    plugins: set[tuple[str, str, str]] = set()
    for label in labels:
        estimator, variant = variants.get(label, (label, {}))
        run_overrides = _merge_variant(overrides, variant, task_fields)
        plan = plan_run(task, estimator, run_overrides, epochs=run_epochs, seed=0, device=device, data_dir=data_dir)
        entries.append(Entry(label, estimator, dict(variant), run_overrides, row_settings(plan)))
        for group, name, cls in (
            (registry.tasks.group, task, plan.task_cls),
            (registry.estimators.group, estimator, plan.estimator_cls),
        ):
            plugin = _runtime_plugin(group, name, cls)
            if plugin is not None:
                plugins.add(plugin)
    return Reproduction(
        task=task,
        paper_epochs=task_cls.default_epochs,
        epochs=run_epochs,
        seeds=tuple(task_cls.paper_seeds if seeds is None else seeds),
        overrides=dict(overrides),
        device=str(device_of(device)),  # "auto" resolved: the report states the device the runs use
        data_dir=data_dir,
        entries=tuple(entries),
        runtime_plugins=tuple(sorted(plugins)),
    )
