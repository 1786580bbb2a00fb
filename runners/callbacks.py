"""Callbacks of the :class:`~lvzoo.runners.trainer.Trainer` (tracking, checkpoints, progress; the decoder-calls plot
is :mod:`lvzoo.runners.plots`'s) and the :class:`Tracker` behind the tracking callback (MLflow).

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

Tracking: experiment tracking behind a small :class:`Tracker` protocol, implemented with the MLflow client.

The default store is embedded: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns``. For any
``sqlite:///`` store, experiments created by lvzoo keep their artifacts in a ``mlruns`` folder next to the
database file; a remote ``http(s)://`` server chooses its own artifact location.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from torch import Tensor
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.errors import ConfigError, one_line
from lvzoo.runners.plan import RunPlan
from lvzoo.runners.process import RetryingClient, retry_locked, store_creation_lock
from lvzoo.runners.process import default_tracking_uri as default_tracking_uri
from lvzoo.runners.process import sqlite_artifact_location as sqlite_artifact_location

if TYPE_CHECKING:
    from lvzoo.runners.trainer import Trainer


# --- tracking -------------------------------------------------------------------------------------------------

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
#: Tag holding a run's run dir (where its checkpoint is), so ``--resume RUN_ID`` can find the checkpoint.
RUN_DIR_TAG = "lvzoo.run_dir"
#: The query that opens MLflow 3's UI on its model-training view of an experiment (runs table, datasets, charts).
ML_VIEW = "workflowType=machine_learning"
#: Tag holding the one-line message of the error that stopped a FAILED (or KILLED) run.
ERROR_TAG = "lvzoo.error"
#: MLflow accepts at most this many params / metrics per ``log_batch`` call.
_BATCH_LIMIT = 100


class Tracker(Protocol):
    """What the training loop needs from an experiment tracker; one tracker follows one run."""

    @property
    def run_id(self) -> str:
        """Id of the active run."""

    def start(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        """Create a new run in ``experiment`` (created if missing); returns its id."""

    def run_tags(self, run_id: str) -> dict[str, str]:
        """Tags of an existing run (read only)."""

    def resume(self, run_id: str) -> None:
        """Reopen an existing run: later calls log into it and its status is RUNNING again."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log immutable parameters of the run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step``."""

    def has_metric(self, key: str, step: int) -> bool:
        """Whether ``key`` was already logged at ``step``."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (mutable) tags."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a local file into the run's artifacts (under ``artifact_path``)."""

    def end(self, status: RunStatus) -> None:
        """Mark the run terminated with ``status``."""

    def run_url(self) -> str | None:
        """The run's page in the tracking UI, when the store has one."""

    def describe(self, description: str, dataset: Mapping[str, Any]) -> None:
        """Mark the run's experiment as model training with ``description``; log ``dataset`` (``name``, ``digest``,
        ``source`` and the split sizes ``splits``) as the run's training input."""


class MlflowTracker:
    """:class:`Tracker` backed by :class:`mlflow.tracking.MlflowClient` (imported lazily: it is slow); calls are
    retried while another process holds an sqlite store's lock."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # their INFO lines (database creation, migrations) are not ours to print
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        try:
            with store_creation_lock(self.tracking_uri):  # a new store's tables are created by one process
                self.client: Any = RetryingClient(retry_locked(MlflowClient, tracking_uri=self.tracking_uri))
                self.client.search_experiments(max_results=1)  # opens (and if needed creates) the store now
        except Exception as exc:
            raise ConfigError(
                f"cannot open the tracking store {self.tracking_uri!r}: {type(exc).__name__}: "
                f"{one_line(str(exc))[:200]} (check --tracking-uri)"
            ) from None
        self._run_id: str | None = None

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("no active run: call start() or resume() first")
        return self._run_id

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(
                self.client.create_experiment(name, artifact_location=sqlite_artifact_location(self.tracking_uri))
            )
        except MlflowException:  # created concurrently by another process
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def start(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self._experiment_id(experiment), run_name=run_name, tags=dict(tags))
        self._run_id = str(run.info.run_id)
        return self._run_id

    def run_tags(self, run_id: str) -> dict[str, str]:
        run = self.client.get_run(run_id)
        return {str(key): str(value) for key, value in run.data.tags.items()}

    def resume(self, run_id: str) -> None:
        run = self.client.get_run(run_id)
        self._run_id = str(run.info.run_id)
        self.client.update_run(self._run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH_LIMIT])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        for start in range(0, len(items), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=items[start : start + _BATCH_LIMIT])

    def has_metric(self, key: str, step: int) -> bool:
        return any(metric.step == step for metric in self.client.get_metric_history(self.run_id, key))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: RunStatus) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def run_url(self) -> str | None:
        """The run's page in the MLflow UI of an ``http(s)://`` tracking server (``None`` for other stores). The
        ``workflowType`` parameter opens MLflow 3's model-training view (its default is the GenAI one)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}?{ML_VIEW}"

    def describe(self, description: str, dataset: Mapping[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        # without the kind, MLflow 3 opens the experiment on its GenAI traces page ("No data")
        self.client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
        self.client.set_experiment_tag(experiment_id, "mlflow.note.content", description)
        splits = dict(dataset.get("splits", {}))
        record = Dataset(
            name=str(dataset["name"]),
            digest=str(dataset["digest"])[:36],
            source_type="local",
            source=json.dumps({"uri": str(dataset.get("source", ""))}),
            profile=json.dumps({"num_rows": sum(splits.values()), "splits": splits}),
        )
        context = InputTag(key="mlflow.data.context", value="training")
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=record, tags=[context])])


# --- callbacks ------------------------------------------------------------------------------------------------

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


class EpochLineCallback(Callback):
    """One line per epoch on stderr (for logs and cluster jobs, where bars do not render): the epoch, the training
    loss, the task's selection metric, the support and the timing; then one line with the test metrics."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        selection = self.trainer.components.task.selection_metric[0]
        shown = {key: metrics[key] for key in ("train_loss", selection, "support_mean") if key in metrics}
        values = "  ".join(f"{key} {value:.5g}" for key, value in shown.items())
        timing = f"{metrics.get('epoch_time_s', 0.0):.1f} s + val {metrics.get('val_time_s', 0.0):.1f} s"
        print(f"epoch {epoch + 1}/{self.trainer.epochs}  {values}  ({timing})", file=sys.stderr, flush=True)

    def on_test_end(self, metrics: Mapping[str, float]) -> None:
        values = "  ".join(f"{key} {value:.5g}" for key, value in sorted(metrics.items()))
        print(f"test  {values}", file=sys.stderr, flush=True)


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
        ckpt.save_checkpoint(state, self.path)
        self.saved = True

    def on_train_end(self, metrics: Mapping[str, float]) -> None:
        # The final checkpoint is the last epoch's (RNG states from before testing) marked finished.
        final = ckpt.load_checkpoint(self.path)[0] if self.saved else dict(self.resumed or {})
        final.update({"finished": True, "test_metrics": dict(metrics), "epochs": self.plan.epochs})
        ckpt.save_checkpoint(final, self.path)


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
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the run directory {str(self.run_dir)!r}: {exc.strerror or exc} "
                "(choose another --run-dir)"
            ) from None
        config_path.write_text(json.dumps(self.plan.to_dict(), indent=2) + "\n")
        task = trainer.components.task
        self.tracker.describe(task.description(), task.dataset_description())
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
            self.tracker.set_tags({ERROR_TAG: " ".join(f"{type(error).__name__}: {error}".split())[:4000]})
        with suppress(Exception):
            self.tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
