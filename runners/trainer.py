"""The training loop: epochs of ``train_step`` / backward / Adam step, validation, the final test, and callbacks.

Loss convention: ``Task.train_step`` returns in ``StepOutput.loss`` the *complete* scalar to minimise (the
task knows its objective, including the ``- entropy_coef * entropy`` regulariser, whose coefficient it reads
from its resolved ``config.entropy_coef``). The loop only backpropagates that loss.

Per epoch the loop computes (and ``on_epoch_end`` receives): ``train_loss`` and ``train_<metric>`` (epoch means
of ``StepOutput.metrics``), ``support_mean`` / ``support_p10`` / ``support_median`` / ``support_p90`` (decoder
rows per example), ``decoder_calls_epoch`` and ``decoder_calls`` (cumulative sum of ``StepOutput.support``),
``estimator_<key>`` (the last value of each ``EstimatorResult.logs`` entry, e.g. ``estimator_temperature``),
``val_<metric>`` from ``task.evaluate(..., "val")``, ``epoch_time_s`` and ``val_time_s``. After the last epoch
``on_test_end`` receives the metrics of ``task.evaluate(..., "test", final=True)``.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import Tensor, nn

import lvzoo
from lvzoo import registry
from lvzoo.estimators.base import Estimator, IncompatibleSpaceError
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import (
    Callback,
    CheckpointCallback,
    EpochLineCallback,
    MlflowTracker,
    ProgressCallback,
    Tracker,
    TrackingCallback,
    default_tracking_uri,
)
from lvzoo.runners.guards import NonFiniteGuard
from lvzoo.runners.plan import ConfigError, EstimatorSpec, RunPlan, TaskSpec, one_line, plan_run, reusable_instance
from lvzoo.runners.plots import SUPPORT_STATISTICS, DecoderCallsPlotCallback
from lvzoo.runners.process import ProgressStyle, env_data_dir, git_commit, progress_style, sigterm_raises
from lvzoo.runners.resume import find_checkpoint, plan_from_checkpoint
from lvzoo.tasks.base import Task, evaluation_mode

Split = Literal["val", "test"]


@attrs.define
class Components:
    """The live objects of a run."""

    task: Task[Any]
    model: nn.Module
    estimator: Estimator[Any]
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator

    def load_state(self, state: Mapping[str, Any], *, optimizer: bool = True) -> None:
        """Restore model, estimator, (optimizer) and every RNG from a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.estimator.load_state_dict(state["estimator_state"])
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"], self.shuffle)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); returns the CPU generator used for shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    shuffle = torch.Generator()
    shuffle.manual_seed(seed)
    return shuffle


def build(plan: RunPlan, task: Task[Any] | None = None) -> Components:
    """Seed, then construct the task (unless given), model, estimator and Adam over both modules' parameters."""
    shuffle = seed_everything(plan.seed)
    if task is None:
        try:
            task = plan.task_cls(plan.task_config, plan.data_dir, plan.device)
        except ValueError as exc:  # the task's own validation
            raise ConfigError(f"invalid task config: {one_line(str(exc))}") from None
        except OSError:  # data not found or unreadable: the CLI reports these itself
            raise
        except Exception as exc:  # a plugin that fails at construction
            raise ConfigError(
                f"task {plan.task_name!r} ({registry.class_path(plan.task_cls)}) failed at construction: "
                f"{type(exc).__name__}: {one_line(str(exc))}"
            ) from None
    model = task.build_model().to(plan.device)
    try:
        estimator = plan.estimator_cls(task.latent_space(), plan.estimator_config).to(plan.device)
    except IncompatibleSpaceError as exc:
        raise ConfigError(f"task {plan.task_name!r} cannot use estimator {plan.estimator_name!r}: {exc}") from None
    except ValueError as exc:  # e.g. top-k's k larger than the space: a config that does not fit this task
        raise ConfigError(
            f"estimator {plan.estimator_name!r} does not fit task {plan.task_name!r}: {one_line(str(exc))}"
        ) from None
    except Exception as exc:  # a plugin that fails at construction
        raise ConfigError(
            f"estimator {plan.estimator_name!r} ({registry.class_path(plan.estimator_cls)}) failed at construction: "
            f"{type(exc).__name__}: {one_line(str(exc))}"
        ) from None
    parameters = list({id(p): p for p in [*model.parameters(), *estimator.parameters()]}.values())
    optimizer = torch.optim.Adam(parameters, lr=plan.task_config.lr)
    return Components(task, model, estimator, optimizer, shuffle)


@attrs.define
class TrainState:
    """Where training stands; checkpoints store :meth:`to_dict` at their top level."""

    completed_epochs: int = 0
    global_step: int = 0
    decoder_calls: int = 0
    support_per_epoch: list[dict[str, float]] = attrs.field(factory=list)
    val_metrics: dict[str, float] = attrs.field(factory=dict)
    epoch_metrics: dict[str, float] = attrs.field(factory=dict)
    skipped_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)  # copies the lists and dicts

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> TrainState:
        """The position a checkpoint holds (fields it predates keep their defaults)."""
        stored = {field.name: state[field.name] for field in attrs.fields(cls) if field.name in state}
        return cls(**copy.deepcopy(stored))


def evaluate(components: Components, split: Split, final: bool) -> dict[str, float]:
    """``task.evaluate`` in eval mode without gradients (:func:`~lvzoo.tasks.base.evaluation_mode`)."""
    with evaluation_mode(components.model, components.estimator):
        metrics = components.task.evaluate(components.model, components.estimator, split, final)
    return {key: float(value) for key, value in metrics.items()}


def _epoch_metrics(
    means: Mapping[str, Tensor], support: Tensor, logs: Mapping[str, Tensor], decoder_calls: int
) -> dict[str, float]:
    """Host-side epoch metrics with a single device->host transfer (``decoder_calls``: the calls before)."""
    names = [f"train_{key}" for key in means] + ["support_mean", "decoder_calls_epoch"]
    names += ["support_p10", "support_median", "support_p90"]
    names += [f"estimator_{key}" for key in logs]
    support_f = support.double()
    values = [value.double().mean() for value in means.values()]
    values += [support_f.mean(), support_f.sum()]
    values += list(torch.quantile(support_f, support_f.new_tensor([0.1, 0.5, 0.9])))
    values += [value.double().mean() for value in logs.values()]
    metrics = dict(zip(names, torch.stack(values).cpu().tolist(), strict=True))
    metrics["decoder_calls"] = float(decoder_calls + round(metrics["decoder_calls_epoch"]))
    return metrics


class Trainer:
    """Trains ``components`` up to ``epochs`` from ``state``; ``callbacks`` run in list order at every hook."""

    def __init__(
        self,
        components: Components,
        epochs: int,
        callbacks: Sequence[Callback] = (),
        state: TrainState | None = None,
    ) -> None:
        self.components = components
        self.epochs = epochs
        self.callbacks = list(callbacks)
        self.state = state if state is not None else TrainState()
        self.guard = NonFiniteGuard(
            {"model": components.model, "estimator": components.estimator},
            components.task.config.skip_nonfinite_steps,
            self.state.skipped_steps,
        )

    def fit(self) -> dict[str, float]:
        """The remaining epochs, then the final test; returns the test metrics. On any exception every callback's
        ``on_train_failed`` runs (its own errors are suppressed) and the exception propagates."""
        try:
            for callback in self.callbacks:
                callback.on_train_begin(self)
            for epoch in range(self.state.completed_epochs, self.epochs):
                for callback in self.callbacks:
                    callback.on_epoch_begin(epoch)
                started = time.perf_counter()
                metrics = self._train_epoch(epoch)
                metrics["epoch_time_s"] = time.perf_counter() - started
                for callback in self.callbacks:
                    callback.on_validation_begin(epoch)
                started = time.perf_counter()
                val_metrics = evaluate(self.components, "val", final=False)
                metrics.update({f"val_{key}": value for key, value in val_metrics.items()})
                metrics["val_time_s"] = time.perf_counter() - started
                self._end_epoch(metrics, val_metrics)
                for callback in self.callbacks:
                    callback.on_epoch_end(epoch, metrics)
            test_metrics = evaluate(self.components, "test", final=True)
            for callback in self.callbacks:
                callback.on_test_end(test_metrics)
            for callback in self.callbacks:
                callback.on_train_end(test_metrics)
        except BaseException as error:
            for callback in self.callbacks:
                with suppress(Exception):
                    callback.on_train_failed(error)
            raise
        return test_metrics

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over ``task.train_batches``; updates ``state.global_step`` and returns the epoch metrics."""
        task, model, estimator = self.components.task, self.components.model, self.components.estimator
        optimizer = self.components.optimizer
        model.train()
        estimator.train()
        sums: dict[str, Tensor] = {}
        supports: list[Tensor] = []
        logs: dict[str, Tensor] = {}
        for index, batch in enumerate(task.train_batches(self.components.shuffle)):
            out = task.train_step(model, estimator, batch)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(out.loss)
            if self.guard.skip_step(out.loss, out.metrics, epoch, index):
                continue
            optimizer.step()
            loss = out.loss.detach()
            # the loop's own "loss" wins over a task metric of the same name (each key is summed once per step)
            for key, value in {**out.metrics, "loss": loss}.items():
                value = value.detach()
                sums[key] = sums[key] + value if key in sums else value.clone()
            supports.append(out.support.detach().reshape(-1))
            logs.update(out.logs)
            for callback in self.callbacks:
                callback.on_batch_end(index, loss, supports[-1])
        if not supports:
            raise RuntimeError(f"{type(task).__name__}.train_batches yielded no batches")
        self.state.global_step += len(supports)
        self.state.skipped_steps = self.guard.skipped
        means = {key: total / len(supports) for key, total in sums.items()}
        return _epoch_metrics(means, torch.cat(supports), logs, self.state.decoder_calls)

    def _end_epoch(self, metrics: dict[str, float], val_metrics: dict[str, float]) -> None:
        state = self.state
        state.completed_epochs += 1
        state.decoder_calls = round(metrics["decoder_calls"])
        state.support_per_epoch.append({key: metrics[key] for key in SUPPORT_STATISTICS})
        state.val_metrics = dict(val_metrics)
        state.epoch_metrics = dict(metrics)


# --- one tracked run ------------------------------------------------------------------------------------------


@attrs.frozen
class TrainResult:
    """Outcome of :func:`train`: the run, where its files are, its last metrics, the trained modules and the run's
    page in the MLflow UI (tracking servers only)."""

    run_id: str
    run_dir: Path
    checkpoint: Path
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    model: nn.Module
    estimator: Estimator[Any]
    ui_url: str | None = None


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
    progress: bool | ProgressStyle | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``estimator`` on ``task`` (names, classes or a task instance) and track the run.

    ``overrides`` maps config keys (``lr``, ``task.batch_size``, ``estimator.<field>``; values typed or strings)
    onto the task's paper defaults. ``resume`` (a run id, a run dir or a checkpoint file) continues that run in
    the same MLflow run from its last checkpoint, up to ``epochs`` (default: the run's original epochs); task
    and estimator may then be omitted. ``data_dir`` defaults to ``$LVZOO_DATA`` (None: the task's default).
    All configuration errors raise :class:`ConfigError` before any training or tracking happens. ``callbacks``
    run after the built-in ones (progress, checkpoint, plot, tracking) at every hook. ``progress``: ``"bars"``
    (``True``), ``"lines"`` (one per epoch), ``"none"`` (``False``) or ``None`` for :func:`progress_style`.
    """
    data_path = Path(data_dir) if data_dir is not None else env_data_dir()
    tracking_uri = tracking_uri or (getattr(tracker, "tracking_uri", None) if tracker else None)
    state: dict[str, Any] | None = None
    if resume is not None:
        if overrides:
            raise ConfigError("cannot change the configuration when resuming; drop the --set overrides")
        path, tracker = find_checkpoint(resume, tracker, tracking_uri)
        state, path = ckpt.load_checkpoint(path)
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
    style = progress_style() if progress is None else ("bars" if progress is True else progress or "none")
    hooks: list[Callback] = [ProgressCallback()] if style == "bars" else []
    hooks += [EpochLineCallback()] if style == "lines" else []
    hooks += [
        CheckpointCallback(plan, checkpoint, tracker.run_id, tracking_uri, resumed=state),
        DecoderCallsPlotCallback(directory / "artifacts" / "decoder_calls.png", tracker),
        TrackingCallback(tracker, plan, directory, checkpoint, resumed=state is not None),
        *callbacks,
    ]
    if plan.task_config.diagnose_every:
        from lvzoo.runners.diagnose import DiagnoseCallback

        hooks.append(DiagnoseCallback(plan.task_config.diagnose_every, tracker))
    trainer = Trainer(components, plan.epochs, hooks, TrainState.from_checkpoint(state) if state else None)
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
        ui_url=tracker.run_url(),
    )


def _tags(plan: RunPlan) -> dict[str, str]:
    tags = {"task": plan.task_name, "estimator": plan.estimator_name, "lvzoo_version": lvzoo.__version__}
    tags.update({"mlflow.source.name": "runner (lvzoo)", "mlflow.source.type": "LOCAL"})  # the UI's Source column
    commit = git_commit(Path.cwd())
    if commit is not None:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    return tags


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
    if not (checkpoint_path.is_file() or ckpt.previous_path(checkpoint_path).is_file()):
        raise ConfigError(f"no checkpoint at {str(checkpoint_path)!r}")
    state = ckpt.load_checkpoint(checkpoint_path)[0]
    data_path = Path(data_dir) if data_dir is not None else env_data_dir()
    plan = plan_from_checkpoint(state, task, estimator, epochs=None, device=device, data_dir=data_path)
    components = build(plan)
    components.load_state(state, optimizer=False)
    return evaluate(components, split, final)
