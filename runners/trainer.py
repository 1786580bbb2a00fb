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

import random
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import Estimator, EstimatorResult, IncompatibleSpaceError
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import Callback
from lvzoo.runners.config import ConfigError, one_line
from lvzoo.runners.plan import RunPlan
from lvzoo.runners.plots import SUPPORT_STATISTICS
from lvzoo.tasks.base import Task
from lvzoo.tasks.objective import evaluation_mode

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "completed_epochs": self.completed_epochs,
            "global_step": self.global_step,
            "decoder_calls": self.decoder_calls,
            "support_per_epoch": list(self.support_per_epoch),
            "val_metrics": dict(self.val_metrics),
            "epoch_metrics": dict(self.epoch_metrics),
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> TrainState:
        return cls(
            completed_epochs=int(state["completed_epochs"]),
            global_step=int(state["global_step"]),
            decoder_calls=int(state["decoder_calls"]),
            support_per_epoch=list(state.get("support_per_epoch", [])),
            val_metrics=dict(state["val_metrics"]),
            epoch_metrics=dict(state["epoch_metrics"]),
        )


class _EstimatorLogs:
    """Forward hook keeping the latest ``EstimatorResult.logs`` of the estimator (tensors, no host sync)."""

    def __init__(self) -> None:
        self.latest: dict[str, Tensor] = {}
        self.active = False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active and isinstance(output, EstimatorResult):
            self.latest.update({key: value.detach() for key, value in output.logs.items()})


def evaluate(components: Components, split: Split, final: bool) -> dict[str, float]:
    """``task.evaluate`` in eval mode without gradients (:func:`~lvzoo.tasks.objective.evaluation_mode`)."""
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
        self._logs = _EstimatorLogs()

    def fit(self) -> dict[str, float]:
        """The remaining epochs, then the final test; returns the test metrics. On any exception every callback's
        ``on_train_failed`` runs (its own errors are suppressed) and the exception propagates."""
        hook = self.components.estimator.register_forward_hook(self._logs)
        try:
            for callback in self.callbacks:
                callback.on_train_begin(self)
            for epoch in range(self.state.completed_epochs, self.epochs):
                for callback in self.callbacks:
                    callback.on_epoch_begin(epoch)
                started = time.perf_counter()
                metrics = self._train_epoch()
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
        finally:
            hook.remove()
        return test_metrics

    def _train_epoch(self) -> dict[str, float]:
        """One pass over ``task.train_batches``; updates ``state.global_step`` and returns the epoch metrics."""
        task, model, estimator = self.components.task, self.components.model, self.components.estimator
        optimizer = self.components.optimizer
        model.train()
        estimator.train()
        sums: dict[str, Tensor] = {}
        supports: list[Tensor] = []
        self._logs.active = True
        try:
            for index, batch in enumerate(task.train_batches(self.components.shuffle)):
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
                for callback in self.callbacks:
                    callback.on_batch_end(index, loss, supports[-1])
        finally:
            self._logs.active = False
        if not supports:
            raise RuntimeError(f"{type(task).__name__}.train_batches yielded no batches")
        self.state.global_step += len(supports)
        means = {key: total / len(supports) for key, total in sums.items()}
        return _epoch_metrics(means, torch.cat(supports), self._logs.latest, self.state.decoder_calls)

    def _end_epoch(self, metrics: dict[str, float], val_metrics: dict[str, float]) -> None:
        state = self.state
        state.completed_epochs += 1
        state.decoder_calls = round(metrics["decoder_calls"])
        state.support_per_epoch.append({key: metrics[key] for key in SUPPORT_STATISTICS})
        state.val_metrics = dict(val_metrics)
        state.epoch_metrics = dict(metrics)
