"""Finding a run's checkpoint and re-planning from it (``--resume``, ``runner eval``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lvzoo import registry
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import RUN_DIR_TAG, MlflowTracker, Tracker
from lvzoo.runners.plan import (
    ConfigError,
    EstimatorSpec,
    RunPlan,
    TaskSpec,
    one_line,
    resolve_estimator,
    resolve_task,
)


def find_checkpoint(
    resume: str | Path, tracker: Tracker | None, tracking_uri: str | None
) -> tuple[Path, Tracker | None]:
    """Checkpoint path from a run dir, a checkpoint file or a run id (the latter needs, and returns, a tracker)."""
    candidate = Path(resume)
    if candidate.is_dir() or candidate.is_file():
        path = candidate / ckpt.CHECKPOINT_NAME if candidate.is_dir() else candidate
        if not (path.is_file() or ckpt.previous_path(path).is_file()):
            raise ConfigError(f"no checkpoint {ckpt.CHECKPOINT_NAME} in run dir {str(candidate)!r}")
        return path, tracker
    tracker = tracker or MlflowTracker(tracking_uri)
    try:
        tags = tracker.run_tags(str(resume))
    except Exception as exc:
        raise ConfigError(
            f"cannot resume {str(resume)!r}: not a run dir and not a run id ({one_line(str(exc))})"
        ) from None
    if RUN_DIR_TAG not in tags:
        raise ConfigError(f"run {str(resume)!r} has no {RUN_DIR_TAG} tag; pass its run dir to resume")
    path = Path(tags[RUN_DIR_TAG]) / ckpt.CHECKPOINT_NAME
    if not (path.is_file() or ckpt.previous_path(path).is_file()):
        raise ConfigError(f"run {str(resume)!r} has no checkpoint at {str(path)!r}")
    return path, tracker


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
        if cls is not None and registry.class_path(cls) != state[what]["class"]:
            raise ConfigError(
                f"the checkpoint was trained with {what} {state[what]['name']!r} ({state[what]['class']}), "
                f"not {registry.class_path(cls)}"
            )
    stored = {**state, "device": device, "epochs": state["epochs"] if epochs is None else epochs}
    if data_dir is not None:
        stored["data_dir"] = str(data_dir)
    return RunPlan.from_dict(stored, task_cls, estimator_cls)
