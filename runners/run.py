"""One tracked run: :func:`train` (plan, build, resume, the trainer with its callbacks) and
:func:`evaluate_checkpoint`.

A run is planned (:mod:`lvzoo.runners.plan`), built and seeded (:func:`lvzoo.runners.trainer.build`), restored
from its checkpoint when resumed, then trained by :class:`~lvzoo.runners.trainer.Trainer` with, in this order,
:class:`~lvzoo.runners.callbacks.ProgressCallback` (when shown), ``CheckpointCallback``,
``DecoderCallsPlotCallback`` and ``TrackingCallback``: each epoch is checkpointed before its metrics are logged,
and the run's status is set last.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import lvzoo
from lvzoo.estimators.base import Estimator
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import (
    Callback,
    CheckpointCallback,
    DecoderCallsPlotCallback,
    ProgressCallback,
    TrackingCallback,
)
from lvzoo.runners.config import ConfigError, one_line
from lvzoo.runners.plan import (
    EstimatorSpec,
    RunPlan,
    TaskSpec,
    plan_from_checkpoint,
    plan_run,
    reusable_instance,
)
from lvzoo.runners.process import env_data_dir, git_commit, show_progress, sigterm_raises
from lvzoo.runners.tracking import RUN_DIR_TAG, MlflowTracker, Tracker, default_tracking_uri
from lvzoo.runners.trainer import Split, Trainer, TrainState, build, evaluate


@attrs.frozen
class TrainResult:
    """Outcome of :func:`train`: the run, where its files are, its last metrics and the trained modules."""

    run_id: str
    run_dir: Path
    checkpoint: Path
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    model: nn.Module
    estimator: Estimator[Any]


def train(
    task: TaskSpec | None = None,
    estimator: EstimatorSpec | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    data_dir: str | Path | None = None,
    resume: str | Path | None = None,
    run_dir: str | Path | None = None,
    tracker: Tracker | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``estimator`` on ``task`` (names, classes or a task instance) and track the run.

    ``overrides`` maps config keys (``lr``, ``task.batch_size``, ``estimator.<field>``; values typed or strings)
    onto the task's paper defaults. ``resume`` (a run id, a run dir or a checkpoint file) continues that run in
    the same MLflow run from its last checkpoint, up to ``epochs`` (default: the run's original epochs); task
    and estimator may then be omitted. ``data_dir`` defaults to ``$LVZOO_DATA`` (None: the task's default).
    All configuration errors raise :class:`ConfigError` before any training or tracking happens.
    """
    data_path = Path(data_dir) if data_dir is not None else env_data_dir()
    tracking_uri = tracking_uri or (getattr(tracker, "tracking_uri", None) if tracker else None)
    state: dict[str, Any] | None = None
    if resume is not None:
        if overrides:
            raise ConfigError("cannot change the configuration when resuming; drop the --set overrides")
        path, tracker = find_checkpoint(resume, tracker, tracking_uri)
        state = ckpt.load(path)
        tracking_uri = tracking_uri or str(state["tracking_uri"])
        plan = plan_from_checkpoint(state, task, estimator, epochs=epochs, device=device, data_dir=data_path)
        if state.get("finished") and int(state["completed_epochs"]) >= plan.epochs:
            raise ConfigError(
                f"run {state['run_id']} already completed {state['completed_epochs']} epochs; "
                f"pass more epochs to continue it"
            )
        components = build(plan)
        components.load_state(state)
    else:
        if task is None or estimator is None:
            raise ConfigError("a task and an estimator are required (or resume a run)")
        plan = plan_run(task, estimator, overrides or {}, epochs=epochs, seed=seed, device=device, data_dir=data_path)
        components = build(plan, reusable_instance(task, plan))
    tracking_uri = tracking_uri or default_tracking_uri()
    if tracker is None:
        tracker = MlflowTracker(tracking_uri)
    if state is None:
        tracker.start(plan.task_name, f"{plan.estimator_name}-{plan.seed}", _tags(plan))
    else:
        tracker.resume(str(state["run_id"]))
    if run_dir is not None:
        directory = Path(run_dir)
    elif state is not None and state.get("run_dir"):
        directory = Path(state["run_dir"])
    else:
        directory = Path.cwd() / "runs" / tracker.run_id
    directory = directory.resolve()
    checkpoint = directory / ckpt.CHECKPOINT_NAME
    callbacks: list[Callback] = [ProgressCallback()] if (show_progress() if progress is None else progress) else []
    callbacks += [
        CheckpointCallback(plan, checkpoint, tracker.run_id, tracking_uri, resumed=state),
        DecoderCallsPlotCallback(directory / "artifacts" / "decoder_calls.png", tracker),
        TrackingCallback(tracker, plan, directory, checkpoint, resumed=state is not None),
    ]
    trainer = Trainer(components, plan.epochs, callbacks, TrainState.from_checkpoint(state) if state else None)
    with sigterm_raises():
        test_metrics = trainer.fit()
    return TrainResult(
        run_id=tracker.run_id,
        run_dir=directory,
        checkpoint=checkpoint,
        val_metrics=trainer.state.val_metrics,
        test_metrics=test_metrics,
        model=components.model,
        estimator=components.estimator,
    )


def _tags(plan: RunPlan) -> dict[str, str]:
    tags = {"task": plan.task_name, "estimator": plan.estimator_name, "lvzoo_version": lvzoo.__version__}
    commit = git_commit(Path.cwd())
    if commit is not None:
        tags["git_commit"] = commit
    return tags


def find_checkpoint(
    resume: str | Path, tracker: Tracker | None, tracking_uri: str | None
) -> tuple[Path, Tracker | None]:
    """Checkpoint path from a run dir, a checkpoint file or a run id (the latter needs, and returns, a tracker)."""
    candidate = Path(resume)
    if candidate.is_dir() or candidate.is_file():
        path = candidate / ckpt.CHECKPOINT_NAME if candidate.is_dir() else candidate
        if not path.is_file():
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
    if not path.is_file():
        raise ConfigError(f"run {str(resume)!r} has no checkpoint at {str(path)!r}")
    return path, tracker


def evaluate_checkpoint(
    path: str | Path,
    split: Split = "test",
    *,
    final: bool = False,
    device: str | torch.device = "cpu",
    data_dir: str | Path | None = None,
    task: TaskSpec | None = None,
    estimator: EstimatorSpec | None = None,
) -> dict[str, float]:
    """Evaluate the model and estimator of a checkpoint on ``split`` (``"val"`` or ``"test"``)."""
    if split not in ("val", "test"):
        raise ConfigError(f"bad split {split!r}; accepted: val, test")
    checkpoint_path = Path(path)
    if checkpoint_path.is_dir():
        checkpoint_path = checkpoint_path / ckpt.CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        raise ConfigError(f"no checkpoint at {str(checkpoint_path)!r}")
    state = ckpt.load(checkpoint_path)
    data_path = Path(data_dir) if data_dir is not None else env_data_dir()
    plan = plan_from_checkpoint(state, task, estimator, epochs=None, device=device, data_dir=data_path)
    components = build(plan)
    components.load_state(state, optimizer=False)
    return evaluate(components, split, final)
