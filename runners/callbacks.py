"""Callbacks of the :class:`~lvzoo.runners.trainer.Trainer`: tracking, checkpoints, progress bars and plots.

Hook points, in the order one run reaches them (epochs are 0-based; callbacks run in list order at each):

- ``on_train_begin(trainer)``: before the first remaining epoch; ``trainer.state`` is the resumed position.
- ``on_epoch_begin(epoch)``.
- ``on_batch_end(batch, loss, support)``: after each optimizer step; ``batch`` is the 0-based index in the
  epoch, ``loss`` the detached step loss (device scalar), ``support`` the decoder rows per example ``[B]``.
- ``on_validation_begin(epoch)``: after the epoch's last batch.
- ``on_epoch_end(epoch, metrics)``: after validation; ``metrics`` are the epoch's host metrics
  (:mod:`lvzoo.runners.trainer`) and ``trainer.state`` already counts the epoch.
- ``on_test_end(metrics)``: the final test metrics (unprefixed), after the last epoch.
- ``on_train_end(metrics)``: the same test metrics, after every ``on_test_end``.
- ``on_train_failed(error)``: the exception (``KeyboardInterrupt`` included) that stopped the run; errors
  raised here are suppressed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.plan import RunPlan
from lvzoo.runners.plots import plot_decoder_calls
from lvzoo.runners.tracking import RUN_DIR_TAG, Tracker

if TYPE_CHECKING:
    from lvzoo.runners.trainer import Trainer

#: Read loss/support from the device for the progress bar only every this many steps.
POSTFIX_EVERY = 20


class Callback:
    """Base class: every hook does nothing; ``on_train_begin`` keeps the trainer as ``self.trainer``."""

    trainer: Trainer

    def on_train_begin(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, epoch: int) -> None:
        pass

    def on_batch_end(self, batch: int, loss: Tensor, support: Tensor) -> None:
        pass

    def on_validation_begin(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        pass

    def on_test_end(self, metrics: Mapping[str, float]) -> None:
        pass

    def on_train_end(self, metrics: Mapping[str, float]) -> None:
        pass

    def on_train_failed(self, error: BaseException) -> None:
        pass


class ProgressCallback(Callback):
    """A tqdm bar per epoch (cleared at validation) with the loss and support every :data:`POSTFIX_EVERY` steps."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_begin(self, epoch: int) -> None:
        self.bar = tqdm(
            total=self.trainer.components.task.steps_per_epoch(),
            desc=f"epoch {epoch + 1}/{self.trainer.epochs}",
            leave=False,
            dynamic_ncols=True,
        )

    def on_batch_end(self, batch: int, loss: Tensor, support: Tensor) -> None:
        self.bar.update(1)
        if batch % POSTFIX_EVERY == 0:
            self.bar.set_postfix(loss=f"{float(loss):.4g}", support=f"{float(support.float().mean()):.3g}")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_validation_begin(self, epoch: int) -> None:
        self._close()

    def on_train_failed(self, error: BaseException) -> None:
        self._close()


class CheckpointCallback(Callback):
    """Writes ``path`` atomically after every epoch and, marked finished with the test metrics, at the end.

    ``resumed``: the checkpoint the run continues (its state is the final one when no epoch is left to train).
    """

    def __init__(
        self,
        plan: RunPlan,
        path: Path,
        run_id: str,
        tracking_uri: str,
        resumed: Mapping[str, Any] | None = None,
    ) -> None:
        self.plan, self.path, self.run_id, self.tracking_uri = plan, path, run_id, tracking_uri
        self.resumed = resumed
        self.saved = False

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        components = self.trainer.components
        state = {
            "format": ckpt.CHECKPOINT_FORMAT,
            **self.plan.to_dict(),
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "model": components.model.state_dict(),
            "estimator_state": components.estimator.state_dict(),
            "optimizer": components.optimizer.state_dict(),
            "rng": ckpt.capture_rng(components.shuffle),
            **self.trainer.state.to_dict(),
            "run_dir": str(self.path.parent),
            "finished": False,
        }
        ckpt.save_atomic(state, self.path)
        self.saved = True

    def on_train_end(self, metrics: Mapping[str, float]) -> None:
        # The final checkpoint is the last epoch's (RNG states from before testing) marked finished.
        final = ckpt.load(self.path) if self.saved else dict(self.resumed or {})
        final.update({"finished": True, "test_metrics": dict(metrics), "epochs": self.plan.epochs})
        ckpt.save_atomic(final, self.path)


class DecoderCallsPlotCallback(Callback):
    """At the end, plots the decoder calls per example of every epoch to ``path`` and logs it under ``plots``."""

    def __init__(self, path: Path, tracker: Tracker) -> None:
        self.path, self.tracker = path, tracker

    def on_train_end(self, metrics: Mapping[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker.log_artifact(plot_decoder_calls(self.trainer.state.support_per_epoch, self.path), "plots")


class TrackingCallback(Callback):
    """MLflow side of a run: tags, ``config.json``, params (or a resumed run's missing metrics), per-epoch and
    test metrics, the checkpoint and task artifacts, and the run's final status (list it last)."""

    def __init__(
        self, tracker: Tracker, plan: RunPlan, run_dir: Path, checkpoint: Path, *, resumed: bool = False
    ) -> None:
        self.tracker, self.plan, self.run_dir, self.checkpoint = tracker, plan, run_dir, checkpoint
        self.resumed = resumed

    def on_train_begin(self, trainer: Trainer) -> None:
        super().on_train_begin(trainer)
        self.tracker.set_tags(
            {RUN_DIR_TAG: str(self.run_dir), "device": str(self.plan.device), "epochs": str(self.plan.epochs)}
        )
        config_path = self.run_dir / "config.json"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(self.plan.to_dict(), indent=2) + "\n")
        if self.resumed:  # a crash between checkpoint and logging leaves the checkpointed epoch's metrics missing
            step = trainer.state.completed_epochs - 1
            metrics = trainer.state.epoch_metrics
            missing = {key: value for key, value in metrics.items() if not self.tracker.has_metric(key, step)}
            if missing:
                self.tracker.log_metrics(missing, step=step)
        else:
            self.tracker.log_params(self.plan.to_params())
        self.tracker.log_artifact(config_path)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=epoch)

    def on_test_end(self, metrics: Mapping[str, float]) -> None:
        self.tracker.log_metrics({f"test_{key}": value for key, value in metrics.items()}, step=self.plan.epochs - 1)

    def on_train_end(self, metrics: Mapping[str, float]) -> None:
        self.tracker.log_artifact(self.checkpoint, "checkpoints")
        components = self.trainer.components
        artifact_dir = self.run_dir / "artifacts"
        artifact_dir.mkdir(parents=True, exist_ok=True)
        for path in components.task.save_artifacts(components.model, components.estimator, artifact_dir):
            self.tracker.log_artifact(path, "task")
        self.tracker.end("FINISHED")

    def on_train_failed(self, error: BaseException) -> None:
        with suppress(Exception):
            self.tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

