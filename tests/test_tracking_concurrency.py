"""Several processes writing one sqlite tracking store at once (as ``reproduce`` and sweeps do) lose no run and no
metric, and never fail with "database is locked": :class:`MlflowTracker` retries a locked call."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import MlflowStore

REPO = Path(__file__).resolve().parents[1]
PROCESSES, STEPS, KEYS = 4, 25, 8

WRITER = """
import sys
from lvzoo.runners.callbacks import MlflowTracker
uri, index, steps, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tracker = MlflowTracker(uri)
tracker.start("concurrent", f"writer-{index}", {"writer": str(index)})
tracker.log_params({f"p{k}": str(k) for k in range(keys)})
tracker.describe("one task", {"name": "shared", "digest": "same-for-all", "splits": {"train": 1}})  # one dataset
for step in range(steps):  # one small write per call: as many lock contentions as possible
    tracker.log_metrics({f"m{k}": index * 1000 + step + k / 10 for k in range(keys)}, step=step)
    tracker.set_tags({"last_step": str(step)})
tracker.end("FINISHED")
"""


def test_four_processes_at_once_lose_no_run_and_no_metric(mlflow_store: MlflowStore, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_store.template, db)
    uri = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, str(i), str(STEPS), str(KEYS)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    errors = [writer.communicate(timeout=300)[1] for writer in writers]
    assert all(writer.returncode == 0 for writer in writers), errors
    assert not any("database is locked" in error for error in errors), errors

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("concurrent")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["writer"] for run in runs) == [str(i) for i in range(PROCESSES)]
    for run in runs:
        index = int(run.data.tags["writer"])
        assert run.info.status == "FINISHED" and run.data.tags["last_step"] == str(STEPS - 1)
        assert len(run.data.params) == KEYS
        assert [item.dataset.name for item in run.inputs.dataset_inputs] == ["shared"]
        for k in range(KEYS):
            history = client.get_metric_history(run.info.run_id, f"m{k}")
            assert sorted(metric.step for metric in history) == list(range(STEPS))
            assert {metric.value for metric in history} == {index * 1000 + step + k / 10 for step in range(STEPS)}


def test_a_store_locked_longer_than_sqlites_busy_timeout_is_waited_for(
    mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    """Another process holds the write lock for 8 s (longer than the 5 s sqlite waits by itself): the writer retries
    instead of failing with "database is locked" and loses nothing."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_store.template, db)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, f"sqlite:///{db}", "0", "3", "2"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(8.0)
    finally:
        locker.execute("COMMIT")
        locker.close()
    _, error = writer.communicate(timeout=300)
    assert writer.returncode == 0, error
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("concurrent")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "m1")) == 3


def test_concurrent_runs_describing_one_experiment_and_dataset_do_not_collide(
    mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    """MLflow checks, then inserts experiment tags and datasets: runs doing it at once collide on a UNIQUE
    constraint (3 of 8 threads did without the retry); :class:`MlflowTracker` retries, so all succeed."""
    from lvzoo.runners.callbacks import MlflowTracker

    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_store.template, db)
    uri = f"sqlite:///{db}"
    trackers = [MlflowTracker(uri) for _ in range(8)]
    for index, tracker in enumerate(trackers):
        tracker.start("shared", f"run-{index}", {})
    errors: list[BaseException] = []

    def describe(tracker: MlflowTracker) -> None:
        try:
            tracker.describe("one task", {"name": "data", "digest": "d", "splits": {"train": 1}})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=describe, args=(tracker,)) for tracker in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    client = MlflowClient(uri)
    for tracker in trackers:
        assert [item.dataset.name for item in client.get_run(tracker.run_id).inputs.dataset_inputs] == ["data"]


OPENER = """
import sys, time
from pathlib import Path
from lvzoo.runners.callbacks import MlflowTracker
uri, go, index = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
while not go.exists():  # every process has imported MLflow: they open the new store together
    time.sleep(0.01)
tracker = MlflowTracker(uri)
tracker.start("fresh", f"opener-{index}", {})
tracker.end("FINISHED")
"""


def test_processes_creating_a_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    """Without the creation lock one of them fails with "table experiments already exists"."""
    uri, go = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, uri, str(go), str(i)], env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(3)
    ]
    time.sleep(8)  # MLflow's import
    go.touch()
    errors = [opener.communicate(timeout=300)[1] for opener in openers]
    assert all(opener.returncode == 0 for opener in openers), errors
    experiment = MlflowClient(uri).get_experiment_by_name("fresh")
    assert experiment is not None
    assert len(MlflowClient(uri).search_runs([experiment.experiment_id])) == 3
