"""One trial of ``runner sweep``, as it runs in a Ray worker: an ordinary tracked :func:`~lvzoo.runners.trainer.train`
run that reports its epoch metrics to Ray Tune.

Each trial trains in its own run dir ``<sweep dir>/trials/<trial id>`` (on the sweep's storage path) and its own
MLflow run, nested under the sweep's parent run (tag ``mlflow.parentRunId``). When Ray retries a trial whose worker
died, the retry finds the run dir's checkpoint and continues the same MLflow run from the last finished epoch
(lvzoo's resume); a retry that finds no checkpoint deletes the dead attempt's MLflow run and starts afresh.

Per epoch the trial reports the epoch metrics plus ``epoch`` (epochs done, the ASHA time attribute) and
``mlflow_run_id``; the last epoch is reported once, at the end, together with the ``test_*`` metrics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import Callback, MlflowTracker
from lvzoo.runners.ray_cluster import use_plugin_dir
from lvzoo.runners.sweep_space import SEED_KEY, Space

if TYPE_CHECKING:
    from lvzoo.runners.trainer import Trainer

SWEEP_TAG = "lvzoo.sweep"
TRIAL_TAG = "lvzoo.sweep.trial_id"
ROLE_TAG = "lvzoo.sweep.role"
STOPPED_EARLY_TAG = "lvzoo.sweep.stopped_early"
PARENT_TAG = "mlflow.parentRunId"
RUN_ID_FILE = "mlflow_run_id"
#: Key of the trial's MLflow run id in its Tune results.
RUN_ID_KEY = "mlflow_run_id"
EPOCH_KEY = "epoch"


@attrs.frozen
class SweepConfig:
    """Everything a sweep runs with (stored as ``<sweep dir>/sweep.json`` for ``--resume``)."""

    name: str
    task: str
    estimator: str
    overrides: Mapping[str, str]
    epochs: int
    device: str
    data_dir: str | None
    tracking_uri: str
    storage_path: str
    space: Space
    metric: str
    mode: str
    scheduler: str
    grace_period: int
    max_concurrent: int | None
    cpus_per_trial: float
    gpus_per_trial: float
    max_failures: int
    plugins: tuple[tuple[str, str, str], ...]
    parent_run_id: str | None = None

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def plugin_dir(self) -> str | None:
        return str(self.sweep_dir / "plugins") if self.plugins else None

    def trial_dir(self, trial_id: str) -> Path:
        return self.sweep_dir / "trials" / trial_id

    def to_json(self) -> str:
        data = attrs.asdict(self, filter=lambda field, value: field.name != "space")
        return json.dumps({**data, "space": json.loads(self.space.to_json())}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SweepConfig:
        data = json.loads(text)
        data["space"] = Space.from_json(json.dumps(data["space"]))
        data["plugins"] = tuple(tuple(item) for item in data["plugins"])
        return cls(**data)


class TrialStopped(KeyboardInterrupt):
    """Ray Tune stopped the trial (a scheduler decision or the end of the sweep): the run is marked KILLED."""


class _TrialTracker(MlflowTracker):
    """Names the run ``<estimator>-<trial id>``, nests it under the parent and records its id in the run dir."""

    def __init__(self, sweep: SweepConfig, trial_id: str, run_dir: Path) -> None:
        super().__init__(sweep.tracking_uri)
        self.sweep, self.trial_id, self.run_dir = sweep, trial_id, run_dir

    def start(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        extra = {SWEEP_TAG: self.sweep.name, TRIAL_TAG: self.trial_id, ROLE_TAG: "trial"}
        if self.sweep.parent_run_id is not None:
            extra[PARENT_TAG] = self.sweep.parent_run_id
        run_id = super().start(experiment, f"{self.sweep.estimator}-{self.trial_id}", {**tags, **extra})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RUN_ID_FILE).write_text(run_id)
        return run_id


class TuneReportCallback(Callback):
    """Reports every epoch's metrics to Ray Tune (the last one at the end, with the test metrics)."""

    def __init__(self, epochs: int, tracker: MlflowTracker) -> None:
        self.epochs, self.tracker = epochs, tracker

    def on_train_begin(self, trainer: Trainer) -> None:
        super().on_train_begin(trainer)
        self.run_id = self.tracker.run_id

    def _report(self, metrics: Mapping[str, Any]) -> None:
        from ray import tune

        try:
            tune.report({**metrics, RUN_ID_KEY: self.run_id})
        except SystemExit:  # how Ray stops a function trial from inside report()
            raise TrialStopped("stopped by Ray Tune") from None

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch + 1 < self.epochs:
            self._report({**metrics, EPOCH_KEY: epoch + 1})

    def on_train_end(self, metrics: Mapping[str, float]) -> None:
        state = self.trainer.state
        final = {**state.epoch_metrics, **{f"test_{key}": value for key, value in metrics.items()}}
        with suppress(TrialStopped):  # the run is complete and tracked: nothing left to stop
            self._report({**final, EPOCH_KEY: state.completed_epochs})


def _report_finished(state: Mapping[str, Any]) -> None:
    """A retry that finds the trial already finished reports its final result again."""
    from ray import tune

    test = {f"test_{key}": value for key, value in dict(state.get("test_metrics", {})).items()}
    tune.report({**state["epoch_metrics"], **test, EPOCH_KEY: state["completed_epochs"], RUN_ID_KEY: state["run_id"]})


def run_trial(config: Mapping[str, Any], sweep: SweepConfig) -> None:
    """The Ray Tune function trainable: ``config`` holds the point of the space (typed values) and the seed."""
    import torch
    from ray import tune

    from lvzoo.runners.trainer import train

    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    use_plugin_dir(sweep.plugin_dir)
    trial_id = str(tune.get_context().get_trial_id())
    run_dir = sweep.trial_dir(trial_id)
    tracker = _TrialTracker(sweep, trial_id, run_dir)
    checkpoint = run_dir / ckpt.CHECKPOINT_NAME
    data_dir = sweep.data_dir
    try:
        if checkpoint.is_file():
            state = ckpt.load(checkpoint)
            if state.get("finished"):
                _report_finished(state)
                return
            train(
                resume=run_dir,
                tracker=tracker,
                device=sweep.device,
                data_dir=data_dir,
                progress=False,
                callbacks=[TuneReportCallback(sweep.epochs, tracker)],
            )
            return
        stale = run_dir / RUN_ID_FILE
        if stale.is_file():  # a previous attempt died before its first checkpoint
            tracker.client.delete_run(stale.read_text().strip())
            stale.unlink()
        point = {key: value for key, value in config.items() if key != SEED_KEY}
        train(
            sweep.task,
            sweep.estimator,
            overrides={**sweep.overrides, **point},
            epochs=sweep.epochs,
            seed=int(config[SEED_KEY]),
            device=sweep.device,
            tracking_uri=sweep.tracking_uri,
            data_dir=data_dir,
            run_dir=run_dir,
            tracker=tracker,
            progress=False,
            callbacks=[TuneReportCallback(sweep.epochs, tracker)],
        )
    except TrialStopped:
        return
