"""The one generic training loop: resolve the configuration, train, validate, checkpoint, track, resume.

Loss convention: ``Task.train_step`` returns in ``StepOutput.loss`` the *complete* scalar to minimise (the
task knows its objective, including the ``- entropy_coef * entropy`` regulariser, whose coefficient it reads
from its resolved ``config.entropy_coef``). The loop only backpropagates that loss.

Per epoch the loop logs (step = epoch index, 0-based): ``train_loss`` and ``train_<metric>`` (epoch means of
``StepOutput.metrics``), ``support_mean`` / ``support_median`` (decoder rows per example),
``decoder_calls`` (cumulative sum of ``StepOutput.support``), ``estimator_<key>`` (the last value of each
``EstimatorResult.logs`` entry, e.g. ``estimator_temperature``), ``val_<metric>`` from
``task.evaluate(..., "val")``, ``epoch_time_s`` and ``val_time_s``. After the last epoch it logs
``test_<metric>`` from ``task.evaluate(..., "test", final=True)``.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm  # type: ignore[import-untyped]

import lvzoo
from lvzoo import registry
from lvzoo.estimators.base import Estimator, EstimatorResult, IncompatibleSpaceError
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.config import (
    ConfigError,
    config_to_dict,
    flatten_params,
    one_line,
    resolve_configs,
)
from lvzoo.runners.plots import SUPPORT_STATISTICS, plot_decoder_calls
from lvzoo.runners.tracking import MlflowTracker, Tracker, default_tracking_uri
from lvzoo.tasks.base import Task, TaskConfig

#: Read loss/support from the device for the progress bar only every this many steps.
POSTFIX_EVERY = 20
RUN_DIR_TAG = "lvzoo.run_dir"
#: Version of the checkpoint layout. 2: resolved configs (no ``None`` for the paper's values), per-epoch support
#: statistics. Older checkpoints are refused with a one-line error naming their format.
CHECKPOINT_FORMAT = 2

TaskSpec = str | type[Task[Any]] | Task[Any]
EstimatorSpec = str | type[Estimator[Any]]
Split = Literal["val", "test"]


class TerminatedError(KeyboardInterrupt):
    """Raised by the SIGTERM handler installed during training (the run is marked KILLED)."""


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


@attrs.frozen
class _Plan:
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
    prebuilt_task: Task[Any] | None = None


@attrs.define
class _Components:
    task: Task[Any]
    model: nn.Module
    estimator: Estimator[Any]
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator


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


def _resolve_task(task: TaskSpec) -> tuple[type[Task[Any]], str, Task[Any] | None]:
    if isinstance(task, str):
        cls = _load_plugin(registry.tasks, task)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"task {task!r} does not name a Task subclass")
        return cls, task, None
    if isinstance(task, Task):
        return type(task), registered_name(registry.tasks.group, type(task)), task
    return task, registered_name(registry.tasks.group, task), None


def _resolve_estimator(estimator: EstimatorSpec) -> tuple[type[Estimator[Any]], str]:
    if isinstance(estimator, str):
        cls = _load_plugin(registry.estimators, estimator)
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise ConfigError(f"estimator {estimator!r} does not name an Estimator subclass")
        return cls, estimator
    return estimator, registered_name(registry.estimators.group, estimator)


def plan_run(
    task: TaskSpec,
    estimator: EstimatorSpec,
    overrides: Mapping[str, Any],
    *,
    epochs: int | None,
    seed: int,
    device: str | torch.device,
    data_dir: Path | None,
) -> _Plan:
    """Resolve and validate a fresh run; every user error is a one-line :class:`ConfigError`."""
    task_cls, task_name, instance = _resolve_task(task)
    estimator_cls, estimator_name = _resolve_estimator(estimator)
    user_overrides = dict(overrides)
    if instance is not None:  # the instance's non-default config values act as the user's own
        defaults = config_to_dict(type(instance.config)())
        base = {
            k: v
            for k, v in config_to_dict(instance.config).items()
            if v != defaults[k] and k not in user_overrides and f"task.{k}" not in user_overrides
        }
        user_overrides = {**{f"task.{k}": v for k, v in base.items()}, **user_overrides}
        data_dir = data_dir if data_dir is not None else instance.data_dir
    torch_device = _device(device)
    task_config, estimator_config = resolve_configs(
        task_cls, estimator_name, estimator_cls.config_class, user_overrides
    )
    reusable = instance is not None and (instance.config, instance.data_dir, instance.device) == (
        task_config,
        data_dir,
        torch_device,
    )
    run_epochs = task_cls.default_epochs if epochs is None else epochs
    if isinstance(run_epochs, bool) or not isinstance(run_epochs, int) or run_epochs < 1:
        raise ConfigError(f"epochs must be a positive int, got {run_epochs!r}")
    return _Plan(
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
        prebuilt_task=instance if reusable else None,
    )


def _construct_task(
    task_cls: type[Task[Any]], config: TaskConfig, data_dir: Path | None, device: torch.device
) -> Task[Any]:
    """``task_cls(...)``; a ``ValueError`` from the task's own validation becomes a :class:`ConfigError`."""
    try:
        return task_cls(config, data_dir, device)
    except ValueError as exc:
        raise ConfigError(f"invalid task config: {one_line(str(exc))}") from None


def _device(device: str | torch.device) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {device!r}: {one_line(str(exc))}; accepted: cpu, cuda, cuda:N") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; accepted: cpu")
    return torch_device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); returns the CPU generator used for shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    shuffle = torch.Generator()
    shuffle.manual_seed(seed)
    return shuffle


def _build(plan: _Plan) -> _Components:
    """Seed, then construct task, model, estimator and the Adam optimizer over both modules' parameters."""
    shuffle = seed_everything(plan.seed)
    task = plan.prebuilt_task
    if task is None:
        task = _construct_task(plan.task_cls, plan.task_config, plan.data_dir, plan.device)
    model = task.build_model().to(plan.device)
    space, input_dim = task.latent_space(), task.encoder_input_dim()
    try:
        estimator = plan.estimator_cls(space, plan.estimator_config, input_dim=input_dim).to(plan.device)
    except IncompatibleSpaceError as exc:
        raise ConfigError(f"task {plan.task_name!r} cannot use estimator {plan.estimator_name!r}: {exc}") from None
    except ValueError as exc:  # e.g. top-k's k larger than the space: a config that does not fit this task
        raise ConfigError(
            f"estimator {plan.estimator_name!r} does not fit task {plan.task_name!r}: {one_line(str(exc))}"
        ) from None
    parameters = list({id(p): p for p in [*model.parameters(), *estimator.parameters()]}.values())
    optimizer = torch.optim.Adam(parameters, lr=plan.task_config.lr)
    return _Components(task, model, estimator, optimizer, shuffle)


def _plan_from_checkpoint(
    state: Mapping[str, Any],
    task: TaskSpec | None,
    estimator: EstimatorSpec | None,
    *,
    epochs: int | None,
    device: str | torch.device,
    data_dir: Path | None,
) -> _Plan:
    """Rebuild the plan a checkpoint was trained with (given task/estimator must match it)."""
    found = state.get("format")
    if found != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint format {found!r} is not supported: this lvzoo {lvzoo.__version__} reads format "
            f"{CHECKPOINT_FORMAT} (retrain, or resume with the lvzoo version that wrote it)"
        )
    task_cls = _resolve_task(task)[0] if task is not None else _stored_class(state["task"], registry.tasks)
    estimator_cls = (
        _resolve_estimator(estimator)[0]
        if estimator is not None
        else _stored_class(state["estimator"], registry.estimators)
    )
    for what, cls in (("task", task_cls), ("estimator", estimator_cls)):
        if class_path(cls) != state[what]["class"]:
            raise ConfigError(
                f"the checkpoint was trained with {what} {state[what]['name']!r} ({state[what]['class']}), "
                f"not {class_path(cls)}"
            )
    run_epochs = int(state["epochs"]) if epochs is None else epochs
    stored_dir = state["data_dir"]
    try:
        task_config = task_cls.config_class(**state["task"]["config"])
        estimator_config = estimator_cls.config_class(**state["estimator"]["config"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the checkpoint's config no longer validates: {one_line(str(exc))}") from None
    return _Plan(
        task_cls=task_cls,
        task_name=state["task"]["name"],
        task_config=task_config,
        estimator_cls=estimator_cls,
        estimator_name=state["estimator"]["name"],
        estimator_config=estimator_config,
        data_dir=data_dir if data_dir is not None else (Path(stored_dir) if stored_dir else None),
        device=_device(device),
        seed=int(state["seed"]),
        epochs=run_epochs,
    )


def _stored_class(entry: Mapping[str, Any], reg: registry.Registry[Any]) -> type[Any]:
    """The class of a checkpoint entry: its registered name first, else its import path."""
    if entry["name"] in reg.names():
        return _load_plugin(reg, entry["name"])  # type: ignore[no-any-return]
    try:
        return import_class(entry["class"])
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {entry['class']!r} for {entry['name']!r}: {one_line(str(exc))}") from None


def _find_checkpoint(
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


def git_commit(cwd: Path) -> str | None:
    """``HEAD`` of the git repository containing ``cwd``, or ``None`` (never raises)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`TerminatedError`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise TerminatedError(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _show_progress() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() != "true"


class _EstimatorLogs:
    """Forward hook keeping the latest ``EstimatorResult.logs`` of the estimator (tensors, no host sync)."""

    def __init__(self) -> None:
        self.latest: dict[str, Tensor] = {}
        self.active = False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active and isinstance(output, EstimatorResult):
            self.latest.update({key: value.detach() for key, value in output.logs.items()})


def _evaluate(components: _Components, split: Split, final: bool) -> dict[str, float]:
    components.model.eval()
    components.estimator.eval()
    try:
        with torch.no_grad():
            metrics = components.task.evaluate(components.model, components.estimator, split, final)
    finally:
        components.model.train()
        components.estimator.train()
    return {key: float(value) for key, value in metrics.items()}


def _train_epoch(
    components: _Components, logs: _EstimatorLogs, epoch: int, epochs: int, progress: bool
) -> tuple[dict[str, Tensor], Tensor, int]:
    """One pass over ``task.train_batches``: (epoch-mean metrics as device tensors, support [N], steps)."""
    task, model, estimator, optimizer = components.task, components.model, components.estimator, components.optimizer
    model.train()
    estimator.train()
    sums: dict[str, Tensor] = {}
    supports: list[Tensor] = []
    steps = 0
    bar = tqdm(
        task.train_batches(components.shuffle),
        total=task.steps_per_epoch(),
        desc=f"epoch {epoch + 1}/{epochs}",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    logs.active = True
    try:
        for batch in bar:
            out = task.train_step(model, estimator, batch)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(out.loss)
            optimizer.step()
            loss = out.loss.detach()
            # the loop's own "loss" wins over a task metric of the same name (each key is summed once per step)
            for key, value in {**out.metrics, "loss": loss}.items():
                value = value.detach()
                sums[key] = sums[key] + value if key in sums else value.clone()
            supports.append(out.support.detach().reshape(-1))
            steps += 1
            if progress and steps % POSTFIX_EVERY == 1:
                bar.set_postfix(loss=f"{float(loss):.4g}", support=f"{float(supports[-1].float().mean()):.3g}")
    finally:
        logs.active = False
        bar.close()
    if steps == 0:
        raise RuntimeError(f"{type(task).__name__}.train_batches yielded no batches")
    means = {key: total / steps for key, total in sums.items()}
    return means, torch.cat(supports), steps


def _epoch_metrics(
    means: Mapping[str, Tensor], support: Tensor, logs: Mapping[str, Tensor], decoder_calls: int
) -> tuple[dict[str, float], int]:
    """Host-side epoch metrics with a single device->host transfer; returns (metrics, new cumulative calls)."""
    names = [f"train_{key}" for key in means] + ["support_mean", "decoder_calls_epoch"]
    names += ["support_p10", "support_median", "support_p90"]
    names += [f"estimator_{key}" for key in logs]
    support_f = support.double()
    values = [value.double().mean() for value in means.values()]
    values += [support_f.mean(), support_f.sum()]
    values += list(torch.quantile(support_f, support_f.new_tensor([0.1, 0.5, 0.9])))
    values += [value.double().mean() for value in logs.values()]
    host = torch.stack(values).cpu().tolist()
    metrics = dict(zip(names, host, strict=True))
    decoder_calls += round(metrics["decoder_calls_epoch"])
    metrics["decoder_calls"] = float(decoder_calls)
    return metrics, decoder_calls


def _checkpoint_state(
    plan: _Plan, components: _Components, tracker: Tracker, tracking_uri: str, progress: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "task": {
            "name": plan.task_name,
            "class": class_path(plan.task_cls),
            "config": config_to_dict(plan.task_config),
        },
        "estimator": {
            "name": plan.estimator_name,
            "class": class_path(plan.estimator_cls),
            "config": config_to_dict(plan.estimator_config),
        },
        "seed": plan.seed,
        "epochs": plan.epochs,
        "data_dir": str(plan.data_dir) if plan.data_dir is not None else None,
        "run_id": tracker.run_id,
        "tracking_uri": tracking_uri,
        "model": components.model.state_dict(),
        "estimator_state": components.estimator.state_dict(),
        "optimizer": components.optimizer.state_dict(),
        "rng": ckpt.capture_rng(components.shuffle),
        **progress,
    }


def _config_json(plan: _Plan) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return {
        "task": plan.task_name,
        "task_class": class_path(plan.task_cls),
        "estimator": plan.estimator_name,
        "estimator_class": class_path(plan.estimator_cls),
        "seed": plan.seed,
        "epochs": plan.epochs,
        "device": str(plan.device),
        "data_dir": str(plan.data_dir) if plan.data_dir is not None else None,
        "task_config": {k: plain(v) for k, v in config_to_dict(plan.task_config).items()},
        "estimator_config": {k: plain(v) for k, v in config_to_dict(plan.estimator_config).items()},
    }


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
    data_path = Path(data_dir) if data_dir is not None else _env_data_dir()
    tracking_uri = tracking_uri or (getattr(tracker, "tracking_uri", None) if tracker else None)
    state: dict[str, Any] | None = None
    if resume is not None:
        if overrides:
            raise ConfigError("cannot change the configuration when resuming; drop the --set overrides")
        path, tracker = _find_checkpoint(resume, tracker, tracking_uri)
        state = ckpt.load(path)
        tracking_uri = tracking_uri or str(state["tracking_uri"])
        plan = _plan_from_checkpoint(state, task, estimator, epochs=epochs, device=device, data_dir=data_path)
        if state.get("finished") and int(state["completed_epochs"]) >= plan.epochs:
            raise ConfigError(
                f"run {state['run_id']} already completed {state['completed_epochs']} epochs; "
                f"pass more epochs to continue it"
            )
    else:
        if task is None or estimator is None:
            raise ConfigError("a task and an estimator are required (or resume a run)")
        plan = plan_run(
            task, estimator, overrides or {}, epochs=epochs, seed=seed, device=device, data_dir=data_path
        )
    components = _build(plan)
    if state is not None:
        components.model.load_state_dict(state["model"])
        components.estimator.load_state_dict(state["estimator_state"])
        components.optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"], components.shuffle)
    tracking_uri = tracking_uri or default_tracking_uri()
    if tracker is None:
        tracker = MlflowTracker(tracking_uri)
    if state is None:
        tracker.start(plan.task_name, f"{plan.estimator_name}-{plan.seed}", _tags(plan))
    else:
        tracker.resume(str(state["run_id"]))
    directory = Path(run_dir) if run_dir is not None else _default_run_dir(state, tracker.run_id)
    return _run(plan, components, tracker, tracking_uri, directory.resolve(), state, progress)


def _env_data_dir() -> Path | None:
    value = os.environ.get("LVZOO_DATA")
    return Path(value) if value else None


def _default_run_dir(state: Mapping[str, Any] | None, run_id: str) -> Path:
    if state is not None and state.get("run_dir"):
        return Path(state["run_dir"])
    return Path.cwd() / "runs" / run_id


def _tags(plan: _Plan) -> dict[str, str]:
    tags = {"task": plan.task_name, "estimator": plan.estimator_name, "lvzoo_version": lvzoo.__version__}
    commit = git_commit(Path.cwd())
    if commit is not None:
        tags["git_commit"] = commit
    return tags


def _run(
    plan: _Plan,
    components: _Components,
    tracker: Tracker,
    tracking_uri: str,
    run_dir: Path,
    state: Mapping[str, Any] | None,
    progress: bool | None,
) -> TrainResult:
    """Train from the checkpointed position (or from scratch) inside one tracked run; sets its final status."""
    show = _show_progress() if progress is None else progress
    checkpoint_path = run_dir / ckpt.CHECKPOINT_NAME
    start_epoch = int(state["completed_epochs"]) if state else 0
    global_step = int(state["global_step"]) if state else 0
    decoder_calls = int(state["decoder_calls"]) if state else 0
    calls_per_epoch: list[dict[str, float]] = list(state.get("support_per_epoch", [])) if state else []
    val_metrics: dict[str, float] = dict(state["val_metrics"]) if state else {}
    logs = _EstimatorLogs()
    hook = components.estimator.register_forward_hook(logs)
    try:
        with sigterm_raises():
            run_dir.mkdir(parents=True, exist_ok=True)
            tracker.set_tags({RUN_DIR_TAG: str(run_dir), "device": str(plan.device), "epochs": str(plan.epochs)})
            config_path = run_dir / "config.json"
            config_path.write_text(json.dumps(_config_json(plan), indent=2) + "\n")
            if state is None:
                tracker.log_params({**flatten_params(plan.task_config, plan.estimator_config), "seed": str(plan.seed)})
            else:
                _log_missing(tracker, state["epoch_metrics"], start_epoch - 1)
            tracker.log_artifact(config_path)
            position: dict[str, Any] = {}
            for epoch in range(start_epoch, plan.epochs):
                started = time.perf_counter()
                means, support, steps = _train_epoch(components, logs, epoch, plan.epochs, show)
                metrics, decoder_calls = _epoch_metrics(means, support, logs.latest, decoder_calls)
                metrics["epoch_time_s"] = time.perf_counter() - started
                global_step += steps
                started = time.perf_counter()
                val_metrics = _evaluate(components, "val", final=False)
                metrics.update({f"val_{key}": value for key, value in val_metrics.items()})
                metrics["val_time_s"] = time.perf_counter() - started
                calls_per_epoch.append({key: metrics[key] for key in SUPPORT_STATISTICS})
                position = {
                    "completed_epochs": epoch + 1,
                    "global_step": global_step,
                    "decoder_calls": decoder_calls,
                    "support_per_epoch": list(calls_per_epoch),
                    "val_metrics": dict(val_metrics),
                    "epoch_metrics": dict(metrics),
                    "run_dir": str(run_dir),
                    "finished": False,
                }
                ckpt.save_atomic(
                    _checkpoint_state(plan, components, tracker, tracking_uri, position), checkpoint_path
                )
                tracker.log_metrics(metrics, step=epoch)
            test_metrics = _evaluate(components, "test", final=True)
            tracker.log_metrics({f"test_{key}": value for key, value in test_metrics.items()}, step=plan.epochs - 1)
            # The final checkpoint is the last epoch's (RNG states from before testing) marked finished.
            final_state = ckpt.load(checkpoint_path) if position else dict(state or {})
            final_state.update({"finished": True, "test_metrics": dict(test_metrics), "epochs": plan.epochs})
            ckpt.save_atomic(final_state, checkpoint_path)
            _log_artifacts(plan, components, tracker, run_dir, checkpoint_path, calls_per_epoch)
            tracker.end("FINISHED")
    except KeyboardInterrupt:
        with suppress(Exception):
            tracker.end("KILLED")
        raise
    except BaseException:
        with suppress(Exception):
            tracker.end("FAILED")
        raise
    finally:
        hook.remove()
    return TrainResult(
        run_id=tracker.run_id,
        run_dir=run_dir,
        checkpoint=checkpoint_path,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        model=components.model,
        estimator=components.estimator,
    )


def _log_missing(tracker: Tracker, metrics: Mapping[str, float], step: int) -> None:
    """After a crash between checkpoint and logging, log the checkpointed epoch's metrics that are missing."""
    missing = {key: value for key, value in metrics.items() if not tracker.has_metric(key, step)}
    if missing:
        tracker.log_metrics(missing, step=step)


def _log_artifacts(
    plan: _Plan,
    components: _Components,
    tracker: Tracker,
    run_dir: Path,
    checkpoint_path: Path,
    calls_per_epoch: list[dict[str, float]],
) -> None:
    artifact_dir = run_dir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    tracker.log_artifact(plot_decoder_calls(calls_per_epoch, artifact_dir / "decoder_calls.png"), "plots")
    tracker.log_artifact(checkpoint_path, "checkpoints")
    for path in components.task.save_artifacts(components.model, components.estimator, artifact_dir):
        tracker.log_artifact(path, "task")


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
    data_path = Path(data_dir) if data_dir is not None else _env_data_dir()
    plan = _plan_from_checkpoint(state, task, estimator, epochs=None, device=device, data_dir=data_path)
    components = _build(plan)
    components.model.load_state_dict(state["model"])
    components.estimator.load_state_dict(state["estimator_state"])
    ckpt.restore_rng(state["rng"], components.shuffle)
    return _evaluate(components, split, final)
