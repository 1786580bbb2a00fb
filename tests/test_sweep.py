"""``runner sweep`` and ``runner reproduce --address`` on a real Ray engine (no mocks).

A loopback Ray head node (``ray start --head --port <free port> --num-cpus 2``) is started once for this module and
killed (its whole process group) at the end, whatever happens; one test runs on a local Ray instance that the
command starts itself. The trials train the runner tests' toy task (``tests.runner_toy``, plus ``tests.sweep_toy``
with a slow-step and a kill-the-worker knob), registered for this process and for the cluster's workers by a
``*.dist-info`` folder on ``sys.path`` / ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.trainer import train
from tests.conftest import MlflowStore
from tests.runner_cli import error_line, invoke

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRY_POINTS = """[lvzoo.tasks]
toy = tests.runner_toy:ToyTask
sweeptoy = tests.sweep_toy:SweepToyTask

[lvzoo.estimators]
tempered = tests.runner_toy:TemperedSoftmax
"""
#: Token authentication for the test cluster and its drivers (Ray's default mode; set explicitly, this session's
#: token rather than ``~/.ray/auth_token``).
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
GRID = ["--grid", "lr=0.01,0.05", "--grid", "entropy_coef=0.0,0.1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose ``*.dist-info`` registers the toy tasks and estimator."""
    root = tmp_path_factory.mktemp("sweep_plugins")
    dist = root / "lvzoo_sweep_toys-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lvzoo-sweep-toys\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def _python_path(plugin_dir: Path) -> str:
    return os.pathsep.join([str(REPO), str(plugin_dir)])


@pytest.fixture(scope="module")
def ray_cluster(plugin_dir: Path) -> Iterator[str]:
    """``127.0.0.1:PORT`` of a 2-CPU Ray head node on loopback; its process group is killed at teardown."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="lvr", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **AUTH, "PYTHONPATH": _python_path(plugin_dir), "OMP_NUM_THREADS": "1", "CI": "true"}
    command = [str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
               "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
               "--temp-dir", temp_dir]
    # ``ray start`` leads a new session and process group, which the head node's daemons stay in
    starter = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output = starter.communicate(timeout=120)[0]
    try:
        assert starter.returncode == 0, output
        yield f"127.0.0.1:{port}"
    finally:
        _kill_group(starter.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_pids(temp_dir: str) -> list[int]:
    """Processes whose command line names ``temp_dir`` (the head node's daemons)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _kill_group(group: int, temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
        for pid in _ray_pids(temp_dir):  # anything that left the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(2)


@pytest.fixture
def env(
    workdir: Path, plugin_dir: Path, mlflow_store: MlflowStore, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> dict[str, Any]:
    """The toy plugins on ``sys.path`` (and ``PYTHONPATH`` for a local Ray instance), a fresh MLflow store."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    importlib.invalidate_caches()
    monkeypatch.setenv("PYTHONPATH", _python_path(plugin_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key, value in AUTH.items():
        monkeypatch.setenv(key, value)
    db = mlflow_store.copy_to(workdir)
    uri = f"sqlite:///{db}"
    return {"uri": uri, "client": MlflowClient(tracking_uri=uri), "dir": workdir}


def sweep_args(env: dict[str, Any], name: str, *extra: str) -> list[str]:
    return ["sweep", "--tracking-uri", env["uri"], "--storage-path", str(env["dir"] / "sweeps"), "--name", name,
            *extra]


def runs_of(client: MlflowClient, experiment: str, **tags: str) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    query = " and ".join(f"tags.`{key.replace('_', '.')}` = '{value}'" for key, value in tags.items())
    return list(client.search_runs([found.experiment_id], filter_string=query, max_results=100))


def parent_and_children(client: MlflowClient, experiment: str, name: str) -> tuple[Any, list[Any]]:
    parents = runs_of(client, experiment, lvzoo_sweep=name, lvzoo_sweep_role="parent")
    assert len(parents) == 1
    children = runs_of(client, experiment, mlflow_parentRunId=parents[0].info.run_id)
    return parents[0], children


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def check_grid_sweep(env: dict[str, Any], name: str) -> None:
    """4 FINISHED children with the grid's params and finite metrics; the parent holds the space, best, table."""
    client = env["client"]
    parent, children = parent_and_children(client, "toy", name)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.task.lr"] == "0.01,0.05"
    assert parent.data.params["space.task.entropy_coef"] == "0.0,0.1"
    assert len(children) == 4
    combos = set()
    for child in children:
        assert child.info.status == "FINISHED"
        combos.add((child.data.params["task.lr"], child.data.params["task.entropy_coef"]))
        assert [step for step, _ in history(client, child.info.run_id, "val_loss")] == [0, 1]
        for key in ("val_loss", "test_loss", "train_loss"):
            assert math.isfinite(child.data.metrics[key])
    assert combos == {("0.01", "0.0"), ("0.01", "0.1"), ("0.05", "0.0"), ("0.05", "0.1")}
    best = min(children, key=lambda child: child.data.metrics["val_loss"])
    assert parent.data.tags["lvzoo.sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == best.data.metrics["val_loss"]
    assert '"task.lr": 0.05' in parent.data.tags["lvzoo.sweep.best_config"]
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_results.md", "sweep_results.csv", "best_config.json"} <= artifacts
    table = (env["dir"] / "sweeps" / name / "sweep_results.md").read_text()
    assert table.count("| FINISHED |") == 4
    for child in children:
        assert Path(child.data.tags["lvzoo.run_dir"]).is_relative_to(env["dir"] / "sweeps" / name / "trials")


def test_bad_input_fails_before_any_trial(env: dict[str, Any]) -> None:
    toy = ["--task", "toy", "--estimator", "tempered"]
    cases = {
        "unknown key 'nope'": [*toy, "--grid", "nope=1,2"],
        "is not a float": [*toy, "--grid", "lr=0.1,fast"],
        "cannot use estimator": [*toy, "--set", "bits=true"],
        "does not report metric 'val_nope'": [*toy, "--metric", "val_nope", "--mode", "min"],
        "cannot reach the Ray cluster": [*toy, "--address", f"127.0.0.1:{free_port()}"],
        "ranges need --search random": [*toy, "--grid", "lr=uniform:0.1:0.2"],
    }
    for expected, args in cases.items():
        result = invoke(sweep_args(env, "bad", *args))
        assert expected in error_line(result), (expected, result.stderr)
    assert not (env["dir"] / "sweeps" / "bad").exists()
    assert env["client"].get_experiment_by_name("toy") is None  # no run, not even the parent


def test_sweep_on_a_local_instance(env: dict[str, Any]) -> None:
    started = time.perf_counter()
    result = invoke(sweep_args(env, "local", "--task", "toy", "--estimator", "tempered", *GRID, "--epochs", "2"))
    print(f"2x2 sweep on a local Ray instance: {time.perf_counter() - started:.1f} s")
    assert result.exit_code == 0, result.output
    check_grid_sweep(env, "local")


def test_grid_sweep_on_the_cluster(env: dict[str, Any], ray_cluster: str) -> None:
    started = time.perf_counter()
    args = ["--task", "toy", "--estimator", "tempered", *GRID, "--epochs", "2", "--address", ray_cluster]
    result = invoke(sweep_args(env, "grid", *args))
    print(f"2x2 sweep on the loopback cluster: {time.perf_counter() - started:.1f} s")
    assert result.exit_code == 0, result.output
    assert "Best trial" in result.stdout
    check_grid_sweep(env, "grid")


def test_killed_worker_resumes_from_its_checkpoint(env: dict[str, Any], ray_cluster: str) -> None:
    marker = env["dir"] / "killed"
    overrides = ["--set", f"kill_file={marker}", "--set", "kill_at_step=6"]  # 4 steps per epoch: mid epoch 2
    args = ["--task", "sweeptoy", "--estimator", "tempered", "--seeds", "7", "--epochs", "3", *overrides,
            "--max-failures", "1", "--address", ray_cluster]
    result = invoke(sweep_args(env, "killed", *args))
    assert result.exit_code == 0, result.output
    assert marker.read_text().isdigit()  # a worker process was SIGKILLed mid-run
    client = env["client"]
    _, children = parent_and_children(client, "sweeptoy", "killed")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    run_id = children[0].info.run_id
    reference = train("sweeptoy", "tempered", overrides={"kill_file": str(marker), "kill_at_step": 6}, epochs=3,
                      seed=7, tracking_uri=env["uri"], run_dir=env["dir"] / "reference", progress=False)
    # the retry continued the same run from epoch 1's checkpoint: every epoch once, as an uninterrupted run
    assert history(client, run_id, "val_loss") == history(client, reference.run_id, "val_loss")
    assert children[0].data.metrics["test_loss"] == reference.test_metrics["loss"]


def test_asha_stops_a_bad_trial_early(env: dict[str, Any], ray_cluster: str) -> None:
    args = ["--task", "toy", "--estimator", "tempered", "--grid", "lr=0.05,0.0001", "--epochs", "3",
            "--scheduler", "asha", "--max-concurrent", "1", "--address", ray_cluster]
    result = invoke(sweep_args(env, "asha", *args))
    assert result.exit_code == 0, result.output
    client = env["client"]
    _, children = parent_and_children(client, "toy", "asha")
    by_lr = {child.data.params["task.lr"]: child for child in children}
    good, bad = by_lr["0.05"], by_lr["0.0001"]
    assert good.info.status == "FINISHED" and len(history(client, good.info.run_id, "val_loss")) == 3
    assert bad.data.tags.get("lvzoo.sweep.stopped_early") == "true" and bad.info.status == "KILLED"
    assert len(history(client, bad.info.run_id, "val_loss")) < 3
    assert "test_loss" not in bad.data.metrics


def _checkpoints(trials: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(trials.glob(f"*/{ckpt.CHECKPOINT_NAME}")):
        try:
            found.append(ckpt.load(path))
        except Exception:  # being replaced right now
            continue
    return found


def test_resume_runs_only_the_unfinished_trials(env: dict[str, Any], ray_cluster: str, plugin_dir: Path) -> None:
    args = sweep_args(env, "interrupted", "--task", "sweeptoy", "--estimator", "tempered", "--grid", "lr=0.05,0.01",
                      "--epochs", "3", "--set", "delay=0.4", "--max-concurrent", "1", "--address", ray_cluster)
    child_env = {**os.environ, "PYTHONPATH": _python_path(plugin_dir), "CI": "true"}
    driver = subprocess.Popen([str(BIN / "runner"), *args], cwd=env["dir"], env=child_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials = env["dir"] / "sweeps" / "interrupted" / "trials"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the first trial finished, the second checkpointed an epoch
            states = _checkpoints(trials)
            if len(states) == 2 and sum(bool(state.get("finished")) for state in states) == 1:
                break
            assert driver.poll() is None, driver.communicate()[0]
            time.sleep(0.2)
        else:
            pytest.fail("the sweep did not reach its second trial")
        driver.send_signal(signal.SIGINT)
        output = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output
    client = env["client"]
    parent, children = parent_and_children(client, "sweeptoy", "interrupted")
    assert parent.info.status == "KILLED"
    done = {child.info.run_id: child for child in children if child.info.status == "FINISHED"}
    assert len(children) == 2 and len(done) == 1
    unfinished = next(child.info.run_id for child in children if child.info.run_id not in done)

    result = invoke(["sweep", "--resume", str(trials.parent), "--address", ray_cluster])
    assert result.exit_code == 0, result.output
    parent, children = parent_and_children(client, "sweeptoy", "interrupted")
    assert parent.info.status == "FINISHED"
    assert {child.info.run_id for child in children} == {*done, unfinished}
    for child in children:
        assert child.info.status == "FINISHED"
        assert [step for step, _ in history(client, child.info.run_id, "val_loss")] == [0, 1, 2]
        if child.info.run_id in done:  # not redone
            assert child.info.end_time == done[child.info.run_id].info.end_time


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_reproduce_on_the_cluster_matches_the_local_run(env: dict[str, Any], ray_cluster: str) -> None:
    base = ["reproduce", "--task", "toy", "--estimators", "tempered", "--seeds", "5,6", "--epochs", "1",
            "--tracking-uri", env["uri"]]
    local = invoke([*base, "--address", "pool", "--jobs", "2", "--out", str(env["dir"] / "local.md")])
    assert local.exit_code == 0, local.output
    started = time.perf_counter()
    remote = invoke([*base, "--address", ray_cluster, "--out", str(env["dir"] / "ray.md")])
    print(f"reproduce (1 row x 2 seeds) on the loopback cluster: {time.perf_counter() - started:.1f} s")
    assert remote.exit_code == 0, remote.output
    local_table, ray_table = (_table((env["dir"] / name).read_text()) for name in ("local.md", "ray.md"))
    assert len(local_table) == 2 and "| 2/2 |" in local_table[1]
    assert ray_table == local_table


def test_the_space_is_typed_and_validated(env: dict[str, Any]) -> None:
    from lvzoo.runners import ConfigError
    from lvzoo.runners.sweep_space import Planner, parse_space

    planner = Planner("toy", "tempered", {"noise": "0.2"}, 2, None)
    space, plans = parse_space(planner, ["lr=0.01,1e-1", "estimator.temperature=loguniform:0.5:2"], [1, 2],
                               "random", 3)
    assert [(dim.key, dim.values, dim.kind) for dim in space.dimensions] == [
        ("task.lr", (0.01, 0.1), None),
        ("estimator.temperature", (), "loguniform"),
    ]
    assert [plan.task_config.lr for plan in plans] == [0.01, 0.1]
    assert all(plan.task_config.noise == 0.2 for plan in plans)
    assert space.to_params()["space.estimator.temperature"] == "loguniform:0.5:2.0"
    for specs, search, expected in [
        (["temperature=loguniform:2:0.5"], "random", "needs 0 < LOW < HIGH"),
        (["temperature=loguniform:0:2"], "random", "temperature must be a number > 0"),
        (["temperature=-1,1"], "grid", "invalid estimator config"),
        (["lr=0.1", "task.lr=0.2"], "grid", "same config field twice"),
        (["seed=1,2"], "grid", "use --seeds"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            parse_space(planner, specs, [0], search, 1)  # type: ignore[arg-type]
