"""MLflow tracking: the Tracker implementation, the embedded default store, git tags and a real ``mlflow server``."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from lvzoo.runners import MlflowTracker, default_tracking_uri, train
from lvzoo.runners.callbacks import sqlite_artifact_location
from lvzoo.runners.cli import main
from lvzoo.runners.process import git_commit
from tests.conftest import MlflowStore
from tests.runner_toy import NUM_CODES, TemperedSoftmax, ToyTask

SERVER_START_TIMEOUT_S = 120


def test_tracker_logs_and_resumes_a_run(mlflow_store: MlflowStore, tmp_path: Path) -> None:
    tracker = MlflowTracker(mlflow_store.uri)
    run_id = tracker.start("tracker-test", "unit-0", {"kind": "unit"})
    tracker.log_params({f"p{i}": str(i) for i in range(150)})  # more than one MLflow batch
    tracker.log_metrics({"a": 1.5, "b": float("nan")}, step=3)
    assert tracker.has_metric("a", 3) and not tracker.has_metric("a", 2) and not tracker.has_metric("c", 3)
    tracker.set_tags({"extra": "yes"})
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note, "notes")
    tracker.end("KILLED")

    client = MlflowClient(mlflow_store.uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "unit-0"
    assert len(run.data.params) == 150 and run.data.params["p149"] == "149"
    assert run.data.metrics["a"] == 1.5 and math.isnan(run.data.metrics["b"])
    assert run.data.tags["kind"] == "unit" and run.data.tags["extra"] == "yes"
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]

    again = MlflowTracker(mlflow_store.uri)
    assert again.run_tags(run_id)["extra"] == "yes"
    again.resume(run_id)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_metrics({"a": 2.0}, step=4)
    again.end("FINISHED")
    assert [m.step for m in client.get_metric_history(run_id, "a")] == [3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(RuntimeError, match="no active run"):
        _ = MlflowTracker(mlflow_store.uri).run_id


def test_artifact_location_sits_next_to_an_sqlite_database(tmp_path: Path) -> None:
    assert sqlite_artifact_location(f"sqlite:///{tmp_path}/x/m.db") == (tmp_path / "x" / "mlruns").as_uri()
    assert sqlite_artifact_location("http://127.0.0.1:5000") is None
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_default_store_is_embedded_in_the_working_directory(mlflow_store: MlflowStore, workdir: Path) -> None:
    mlflow_store.copy_to(workdir)  # an already migrated ./mlflow.db, so the run does not wait for migrations
    result = train(ToyTask, TemperedSoftmax, epochs=1)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert result.run_dir == workdir.resolve() / "runs" / result.run_id
    assert run.info.artifact_uri.startswith((workdir.resolve() / "mlruns").as_uri())
    assert (workdir / "mlruns" / result.run_id / "artifacts" / "config.json").is_file()
    assert "git_commit" not in run.data.tags  # the working directory is not a git repository


def test_git_commit_is_read_only_inside_a_repository(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    repo = tmp_path / "repo"
    repo.mkdir()
    identity = ["-c", "user.name=lvzoo", "-c", "user.email=lvzoo@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", *identity, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    assert git_commit(repo) == head.stdout.strip()
    assert git_commit(repo / "missing") is None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


@attrs.frozen
class _Server:
    process: subprocess.Popen[bytes]
    url: str
    artifacts: Path
    log_path: Path


@pytest.fixture(scope="module", autouse=True)
def _server_boot(mlflow_store: MlflowStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    """Launch a real ``mlflow server`` when this module starts, so it boots while the other tests run.

    It listens on a free local port with its own copy of the migrated store; its whole process group is
    terminated at the end of the module.
    """
    root = tmp_path_factory.mktemp("mlflow_server")
    database = mlflow_store.copy_to(root, "server.db")
    port = _free_port()
    with open(root / "server.log", "wb") as log:
        server = _Server(
            process=subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{database}",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--artifacts-destination", str(root / "served-artifacts")],
                cwd=root,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so teardown also stops the uvicorn worker
            ),
            url=f"http://127.0.0.1:{port}",
            artifacts=root / "served-artifacts",
            log_path=root / "server.log",
        )
        try:
            yield server
        finally:
            os.killpg(server.process.pid, signal.SIGTERM)
            try:
                server.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait(timeout=20)


@pytest.fixture
def mlflow_server(_server_boot: _Server) -> tuple[str, Path]:
    """URL and artifact folder of the module's server, once ``/health`` answers (or fail after a timeout)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if _server_boot.process.poll() is not None:
            pytest.fail(f"mlflow server exited early:\n{_server_boot.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{_server_boot.url}/health", timeout=2) as response:
                if response.status == 200:
                    return _server_boot.url, _server_boot.artifacts
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server not healthy within {SERVER_START_TIMEOUT_S} s")
        time.sleep(0.25)


@pytest.mark.usefixtures("toy_plugins", "workdir")
def test_run_logged_to_a_real_tracking_server(mlflow_server: tuple[str, Path]) -> None:
    url, artifacts = mlflow_server
    result = CliRunner().invoke(
        main, ["--task", "toy", "--estimator", "tempered", "--epochs", "2", "--tracking-uri", url, "--seed", "5"]
    )
    assert result.exit_code == 0, result.output
    found = re.search(r"^run (\w+) finished", result.stdout, re.MULTILINE)
    assert found, result.stdout
    run_id = found.group(1)

    query = urllib.parse.urlencode({"run_id": run_id})
    run = _get_json(f"{url}/api/2.0/mlflow/runs/get?{query}")["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tempered-5"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["task.lr"] == "0.05" and params["estimator.temperature"] == "1.0" and params["seed"] == "5"
    metrics = {m["key"]: m for m in run["data"]["metrics"]}
    assert metrics["decoder_calls"]["value"] == 2 * 64 * NUM_CODES and metrics["decoder_calls"]["step"] == 1
    assert math.isfinite(metrics["train_loss"]["value"]) and math.isfinite(metrics["val_loss"]["value"])
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["task"] == "toy" and tags["estimator"] == "tempered"

    history = _get_json(f"{url}/api/2.0/mlflow/metrics/get-history?{query}&metric_key=train_loss")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1]
    uploaded = {path.name for path in artifacts.rglob("*") if path.is_file()}
    assert {"config.json", "checkpoint.pt", "decoder_calls.png", "decoder_weight.txt"} <= uploaded
