"""A non-finite training step stops the run with one line naming the epoch, step and culprit, marks the MLflow run
FAILED with that message and keeps the last good checkpoint; ``skip_nonfinite_steps=N`` skips up to N such steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import ERROR_TAG
from tests.runner_cli import error_line, invoke, printed_run_id
from tests.runner_toy import ToyTask

STEPS_PER_EPOCH = 4  # 64 toy training points, batch size 16


def _runs(uri: str, status: str) -> list[str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.status = '{status}'")
    return [run.info.run_id for run in runs]


@pytest.mark.usefixtures("toy_plugins")
def test_a_nan_step_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(
    mlflow_store: object, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = mlflow_store.uri  # type: ignore[attr-defined]
    monkeypatch.setattr(ToyTask, "nan_at_steps", (STEPS_PER_EPOCH + 2,))  # epoch 2, step 2
    failed_before = set(_runs(uri, "FAILED"))
    result = invoke(["--task", "toy", "--estimator", "tempered", "--epochs", "3", "--tracking-uri", uri])
    line = error_line(result)
    assert result.exit_code == 2
    assert line.startswith("Error: non-finite training step at epoch 2, step 2: loss term")
    assert "skip_nonfinite_steps" in line
    (run_id,) = set(_runs(uri, "FAILED")) - failed_before
    assert "non-finite training step at epoch 2, step 2" in MlflowClient(uri).get_run(run_id).data.tags[ERROR_TAG]
    state, _ = ckpt.load_checkpoint(workdir / "runs" / run_id / ckpt.CHECKPOINT_NAME)
    assert state["completed_epochs"] == 1
    assert all(bool(torch.isfinite(value).all()) for value in state["model"].values())


@pytest.mark.usefixtures("toy_plugins")
def test_skip_nonfinite_steps_skips_and_counts_them(
    mlflow_store: object, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = mlflow_store.uri  # type: ignore[attr-defined]
    monkeypatch.setattr(ToyTask, "nan_at_steps", (2, STEPS_PER_EPOCH + 3))
    args = ["--task", "toy", "--estimator", "tempered", "--epochs", "2", "--tracking-uri", uri]
    result = invoke([*args, "--set", "skip_nonfinite_steps=2"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("Warning: skipped non-finite step at epoch") == 2
    run_id = printed_run_id(result.stdout)
    state, _ = ckpt.load_checkpoint(workdir / "runs" / run_id / ckpt.CHECKPOINT_NAME)
    assert state["skipped_steps"] == 2 and state["global_step"] == 2 * STEPS_PER_EPOCH - 2
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])

    stopped = invoke([*args, "--set", "skip_nonfinite_steps=1"])
    warning, line = stopped.stderr.strip().splitlines()  # the skipped step, then the one that stops the run
    assert stopped.exit_code == 2 and "Traceback" not in stopped.output
    assert warning.startswith("Warning: skipped non-finite step at epoch 1, step 2") and "(1/1 allowed)" in warning
    assert line.startswith("Error: non-finite training step at epoch 2, step 3") and "after 1 skipped step(s)" in line
