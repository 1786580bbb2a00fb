"""Experiment tracking behind a small :class:`Tracker` protocol, implemented with the MLflow client.

The default store is embedded: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns``. For any
``sqlite:///`` store, experiments created by lvzoo keep their artifacts in a ``mlruns`` folder next to the
database file; a remote ``http(s)://`` server chooses its own artifact location.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
#: Tag holding a run's run dir (where its checkpoint is), so ``--resume RUN_ID`` can find the checkpoint.
RUN_DIR_TAG = "lvzoo.run_dir"
#: MLflow accepts at most this many params / metrics per ``log_batch`` call.
_BATCH_LIMIT = 100


def default_tracking_uri(cwd: Path | None = None) -> str:
    """``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """``file://`` URI of the ``mlruns`` folder next to an ``sqlite:///`` database, else ``None``."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    return (database.resolve().parent / "mlruns").as_uri()


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


class MlflowTracker:
    """:class:`Tracker` backed by :class:`mlflow.tracking.MlflowClient` (imported lazily: it is slow)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
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
