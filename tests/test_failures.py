"""Expected failures after validation, through the real ``runner`` console script: one ``Error:`` line naming the
file or value and what to do, exit code 2, the MLflow run (when one was started) FAILED with the message as its
``lvzoo.error`` tag; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lvzoo.runners.callbacks import ERROR_TAG
from tests.datasets import write_random_datasets

RUNNER = Path(sys.executable).with_name("runner")
REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--set", "train_limit=64", "--set", "eval_limit=32"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "LVZOO_OFFLINE": "1", **env}
    environment.pop("LVZOO_DATA", None)
    environment["LVZOO_CACHE"] = str(cwd / "empty-cache")
    return subprocess.run([str(RUNNER), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def failed_run_error(cwd: Path) -> str:
    """The error tag of the one run in ``cwd``'s default store, which must be FAILED."""
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    return str(run.data.tags[ERROR_TAG])


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    directory = tmp_path / "work"  # not next to ../shared/data, so no real dataset is found
    directory.mkdir()
    return directory


def test_data_not_found_is_one_line_and_a_failed_run(cwd: Path) -> None:
    line = one_error_line(run(["--task", "ssvae", "--estimator", "sparsemax", "--data-dir", "no-such-dir", *TINY], cwd))
    assert "MNIST not found in any of: no-such-dir" in line and "LVZOO_OFFLINE" in line and "--data-dir" in line
    assert "MNIST not found" in failed_run_error(cwd)


def test_unreadable_data_names_the_file(cwd: Path) -> None:
    write_random_datasets(cwd / "data", {"FashionMNIST": (64, 32)})
    broken = cwd / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:50])
    line = one_error_line(run(["--task", "bitvec", "--estimator", "sfe", "--data-dir", "data", *TINY], cwd))
    assert f"cannot read {broken.relative_to(cwd)}" in line and "delete it to download it again" in line


def test_unwritable_run_dir_and_tracking_store(cwd: Path) -> None:
    (cwd / "a-file").write_text("not a directory")
    line = one_error_line(
        run(["--task", "ssvae", "--estimator", "sparsemax", "--run-dir", "a-file/run", *TINY], cwd)
    )
    assert line.startswith("Error: cannot create the run directory") and "a-file/run" in line
    assert "choose another --run-dir" in line and "cannot create the run directory" in failed_run_error(cwd)
    line = one_error_line(
        run(["--task", "ssvae", "--estimator", "sparsemax", "--tracking-uri", f"sqlite:///{cwd}/a-file/m.db", *TINY],
            cwd)
    )
    assert line.startswith("Error: cannot open the tracking store 'sqlite:///") and "--tracking-uri" in line


def test_debug_shows_the_traceback(cwd: Path) -> None:
    done = run(["--debug", "--task", "ssvae", "--estimator", "sparsemax", "--data-dir", "no-such-dir", *TINY], cwd)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "DataNotFoundError: MNIST not found" in done.stderr


def test_progress_is_one_line_per_epoch_off_a_terminal_and_none_with_quiet(cwd: Path) -> None:
    write_random_datasets(cwd / "data", {"FashionMNIST": (5100, 40)})
    args = ["--task", "bitvec", "--estimator", "sfe", "--data-dir", "data", "--epochs", "2", "--set", "bits=8",
            "--set", "train_limit=64", "--set", "eval_limit=32", "--set", "is_samples=2", "--set", "final_is_samples=2"]
    shown = run(args, cwd, CI="false")  # stderr is a pipe here, as in a log file or a cluster job
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.strip().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2", "test"], shown.stderr
    assert "train_loss" in lines[0] and "val_neg_elbo" in lines[0] and "INFO" not in shown.stderr
    quiet = run(["--quiet", *args], cwd, CI="false")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
