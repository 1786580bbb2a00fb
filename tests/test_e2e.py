"""End to end: the real tasks trained by the real ``runner`` CLI on small data subsets for one or two short epochs.

Every run reads the real MNIST / Fashion-MNIST files of ``<repo>/../shared/data`` when they are there, else
random images written in the same torchvision layout (gzipped IDX files). Runs log into the session's shared
MLflow store (``tests/conftest.py``); each test reads its run back through :class:`MlflowClient` and checks the
params, per-epoch and test metrics (all finite), tags, artifacts and that the decoder calls match what the
estimator evaluates per example. Interrupted runs (an injected ``KeyboardInterrupt`` in process, a ``SIGKILL`` of
a subprocess) are resumed with ``--resume`` and must continue the same MLflow run from the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from mlflow.tracking import MlflowClient

from lvzoo import registry
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.cli import EXIT_INTERRUPTED, main
from lvzoo.tasks.base import Task, resolve_config
from tests.conftest import MlflowStore
from tests.datasets import REPO, shared_or_random_root
from tests.interrupts import before_call, raise_keyboard_interrupt, sigkill_once_file_exists
from tests.runner_cli import error_line, invoke, printed_run_id

#: One intra-op thread: the models are small and the test machine is shared.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

#: The installed console script (next to the interpreter running the tests).
RUNNER_SCRIPT = Path(sys.executable).parent / "runner"
CPU = torch.device("cpu")

#: Paper's sizes where cheap; the signalling game's networks and vocabulary are shrunk (256 symbols of width 512
#: take seconds per epoch for sparsemax, whose untrained sender has full support).
SSVAE_SETS = ("train_limit=200", "eval_limit=100")
SIGNAL_SETS = (
    "games_per_epoch=192",
    "train_limit=128",
    "eval_limit=128",
    "vocab_size=32",
    "hidden_size=64",
    "embedding_size=32",
)
BITVEC_SETS = ("train_limit=32", "eval_limit=16", "batch_size=16", "is_samples=4", "final_is_samples=8")
SETS = {"ssvae": SSVAE_SETS, "signal": SIGNAL_SETS, "bitvec": BITVEC_SETS}
#: Decoder rows an example can use per task: the 10 classes, the vocabulary, and D + 1 for the bit vectors.
SSVAE_CLASSES, SIGNAL_VOCAB, BITVEC_BITS = 10, 32, 32
#: Training examples per epoch (rows of ``support``) under ``SETS``. ssvae keeps ``train_limit`` images split
#: 1 : 9 between labelled and unlabelled (the paper's and the fallback split's proportion); the estimator sees the
#: unlabelled ones. The game plays ``min(games_per_epoch, train_limit)`` games.
EXAMPLES = {"ssvae": 200 - 20, "signal": 128, "bitvec": 32}
#: Task artifacts besides the runner's (``config.json``, ``checkpoints/``, ``plots/``).
TASK_ARTIFACTS = {"ssvae": ["task/ssvae_samples.png"], "signal": [], "bitvec": ["task/reconstructions.png"]}
#: The test metric with the decoder calls per example.
SUPPORT_METRIC = {"ssvae": "test_decoder_calls", "signal": "test_decoder_calls", "bitvec": "test_decoder_calls"}
#: Test metrics every run of the task reports.
HEADLINE_METRICS = {
    "ssvae": {"test_accuracy", "test_neg_elbo"},
    "signal": {"test_success", "test_loss", "test_entropy"},
    "bitvec": {"test_neg_elbo", "test_rate", "test_distortion", "test_nll", "test_bits_per_dim"},
}
PER_EPOCH_METRICS = ("train_loss", "support_mean", "support_median", "decoder_calls", "epoch_time_s", "val_time_s")


@attrs.frozen
class Case:
    """One task x estimator run; decoder rows per example are ``exact`` or within ``[1, at_most]``.

    ``check_eval``: also re-evaluate the checkpoint with ``runner eval --final`` (marginalizing estimators, whose
    evaluation draws no samples from the global RNG, must reproduce the logged test metrics).
    """

    task: str
    estimator: str
    extra: tuple[str, ...] = ()
    exact: float | None = None
    at_most: float | None = None
    check_eval: bool = False

    @property
    def label(self) -> str:
        return "-".join([self.task, self.estimator, *(s.replace("=", "") for s in self.extra)])

    def check_support(self, per_example: float) -> None:
        if self.exact is not None:
            assert per_example == self.exact
        else:
            assert self.at_most is not None
            assert 1.0 <= per_example <= self.at_most


CASES = [
    Case("ssvae", "sparsemax", at_most=SSVAE_CLASSES, check_eval=True),
    Case("ssvae", "sfe", exact=1.0),
    Case("ssvae", "stgumbel", exact=1.0),
    Case("signal", "sparsemax", at_most=SIGNAL_VOCAB, check_eval=True),
    Case("signal", "sfe+", exact=2.0),
    Case("signal", "gumbel", exact=1.0),
    Case("bitvec", "topksparse", at_most=10, check_eval=True),  # the paper's k = 10
    Case("bitvec", "sparsemap", at_most=BITVEC_BITS + 1),
    Case("bitvec", "sparsemap", extra=("budget=16",), at_most=BITVEC_BITS + 1),
    Case("bitvec", "nvil", exact=1.0),
]


# --- data ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared real data root, or random MNIST (1,200 train / 200 test) and Fashion-MNIST (5,300 train, as the
    last 5,000 validate / 200 test) in the same layout."""
    return shared_or_random_root(tmp_path_factory, {"MNIST": (1200, 200), "FashionMNIST": (5300, 200)})


# --- helpers ------------------------------------------------------------------------------------------------------


def _set_values(assignments: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> ``{"key": "value", ...}``."""
    return {key: value for key, _, value in (assignment.partition("=") for assignment in assignments)}


def _train_args(
    task: str, estimator: str, data_dir: Path, uri: str, epochs: int, extra: Sequence[str] = ()
) -> list[str]:
    """CLI arguments of a training run with the task's small ``SETS`` (and ``extra`` assignments)."""
    options = {"--task": task, "--estimator": estimator, "--epochs": str(epochs), "--data-dir": str(data_dir)}
    options["--tracking-uri"] = uri
    sets = [item for assignment in (*SETS[task], *extra) for item in ("--set", assignment)]
    return [item for pair in options.items() for item in pair] + sets


def _printed_test_metrics(stdout: str) -> dict[str, float]:
    """The JSON line of test metrics that a successful training call prints last."""
    metrics: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
    return metrics


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged value of ``key``, in step order (duplicates kept)."""
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    """Artifact paths of a run, one folder deep."""
    paths: set[str] = set()
    for entry in client.list_artifacts(run_id):
        if entry.is_dir:
            paths.update(child.path for child in client.list_artifacts(run_id, entry.path))
        else:
            paths.add(entry.path)
    return paths


def _task_class(task: str) -> type[Task[Any]]:
    cls = registry.tasks.load(task)
    assert isinstance(cls, type) and issubclass(cls, Task)
    return cls


def _paper_lr(task: str, estimator: str) -> float:
    """The learning rate the task's paper defaults give the estimator (constructing a task loads no data)."""
    config, _ = resolve_config(_task_class(task), estimator)
    return config.lr


def _steps_per_epoch(task: str, estimator: str) -> int:
    """Training steps per epoch under ``SETS``: ``EXAMPLES`` in batches of the set or the paper's batch size."""
    sets = _set_values(SETS[task])
    if "batch_size" in sets:
        batch_size = int(sets["batch_size"])
    else:
        batch_size = resolve_config(_task_class(task), estimator)[0].batch_size
    return math.ceil(EXAMPLES[task] / batch_size)


# --- one epoch per task x estimator -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label)
def test_one_epoch_is_tracked_with_finite_metrics(
    case: Case, data_dir: Path, mlflow_store: MlflowStore, workdir: Path
) -> None:
    result = invoke(_train_args(case.task, case.estimator, data_dir, mlflow_store.uri, epochs=1, extra=case.extra))
    assert result.exit_code == 0, result.output
    run_id = printed_run_id(result.stdout)
    printed = _printed_test_metrics(result.stdout)
    client = MlflowClient(mlflow_store.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == case.task

    tags = run.data.tags
    assert tags["task"] == case.task and tags["estimator"] == case.estimator and tags["epochs"] == "1"
    assert tags["lvzoo.run_dir"] == str((workdir / "runs" / run_id).resolve())
    params = run.data.params
    for key, value in _set_values([*SETS[case.task], *case.extra]).items():
        assert params[f"task.{key}"] == value, key
    assert float(params["task.lr"]) == _paper_lr(case.task, case.estimator)
    assert params["seed"] == "0"

    metrics = run.data.metrics
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    val_keys = [key for key in metrics if key.startswith("val_")]
    train_keys = [key for key in metrics if key.startswith("train_")]
    assert val_keys and train_keys
    for key in (*PER_EPOCH_METRICS, *val_keys, *train_keys):
        history = _history(client, run_id, key)
        assert [step for step, _ in history] == [0], key

    test_metrics = {key: value for key, value in metrics.items() if key.startswith("test_")}
    assert test_metrics == pytest.approx(printed)
    assert HEADLINE_METRICS[case.task] | {SUPPORT_METRIC[case.task]} <= test_metrics.keys()
    for key in test_metrics:
        assert [step for step, _ in _history(client, run_id, key)] == [0], key

    # decoder rows per example, in training (the loop's cumulative count) and at test
    case.check_support(metrics["support_mean"])
    case.check_support(metrics[SUPPORT_METRIC[case.task]])
    assert metrics["decoder_calls"] == pytest.approx(EXAMPLES[case.task] * metrics["support_mean"], rel=1e-9)
    assert metrics["decoder_calls"] == round(metrics["decoder_calls"])

    artifacts = _artifacts(client, run_id)
    expected = {"config.json", "checkpoints/checkpoint.pt", "plots/decoder_calls.png", *TASK_ARTIFACTS[case.task]}
    assert artifacts == expected
    state = ckpt.load(workdir / "runs" / run_id / ckpt.CHECKPOINT_NAME)
    assert state["run_id"] == run_id and state["finished"] is True and state["completed_epochs"] == 1
    assert state["global_step"] == _steps_per_epoch(case.task, case.estimator)
    assert state["decoder_calls"] == metrics["decoder_calls"]
    logged = {key[len("test_") :]: value for key, value in printed.items()}
    assert state["test_metrics"] == pytest.approx(logged)
    if case.check_eval:
        evaluated = invoke(["eval", str(workdir / "runs" / run_id), "--split", "test", "--final"])
        assert evaluated.exit_code == 0, evaluated.output
        assert json.loads(evaluated.stdout) == pytest.approx(logged, rel=1e-5)


# --- resume after interruption ------------------------------------------------------------------------------------


@attrs.frozen
class ResumeCase:
    """A 2-epoch run interrupted in its second epoch; ``counter``: an estimator buffer counting training steps."""

    task: str
    estimator: str
    counter: str | None


def _assert_resumed(client: MlflowClient, run_id: str, first_epoch: dict[str, float], run_dir: Path) -> None:
    """The run finished both epochs in one MLflow run, with epoch 0's metrics logged once and unchanged."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key, value in first_epoch.items():
        history = _history(client, run_id, key)
        assert [step for step, _ in history] == [0, 1], key
        if key not in ("epoch_time_s", "val_time_s"):
            assert history[0][1] == value, key
        assert all(math.isfinite(v) for _, v in history), key
    test_keys = [key for key in run.data.metrics if key.startswith("test_")]
    assert test_keys and all([s for s, _ in _history(client, run_id, key)] == [1] for key in test_keys)
    assert {"checkpoints/checkpoint.pt", "plots/decoder_calls.png"} <= _artifacts(client, run_id)
    state = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    assert state["run_id"] == run_id and state["finished"] is True and state["completed_epochs"] == 2
    calls = _history(client, run_id, "decoder_calls")
    assert calls[1][1] > calls[0][1] == first_epoch["decoder_calls"]
    assert state["decoder_calls"] == calls[1][1]


def _assert_optimizer_steps(state: dict[str, Any], steps: int) -> None:
    """Every optimized parameter (model and estimator, e.g. NVIL's baseline network) took ``steps`` Adam steps."""
    adam = state["optimizer"]["state"]
    assert len(adam) == len(state["optimizer"]["param_groups"][0]["params"])
    assert all(int(entry["step"]) == steps for entry in adam.values())


@pytest.mark.parametrize(
    "case",
    [ResumeCase("ssvae", "sfe", "baseline.updates"), ResumeCase("bitvec", "nvil", None)],
    ids=lambda case: f"{case.task}-{case.estimator}",
)
def test_keyboard_interrupt_in_epoch_two_then_resume(
    case: ResumeCase, data_dir: Path, mlflow_store: MlflowStore, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_cls = _task_class(case.task)
    steps = _steps_per_epoch(case.task, case.estimator)
    original_step = task_cls.train_step
    # at the second step of epoch 2: the second epoch has taken one optimizer step
    monkeypatch.setattr(task_cls, "train_step", before_call(original_step, steps + 2, raise_keyboard_interrupt))
    uri = mlflow_store.uri
    run_dir = workdir / "interrupted"
    result = invoke([*_train_args(case.task, case.estimator, data_dir, uri, epochs=2), "--run-dir", str(run_dir)])
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    assert "the run is marked KILLED" in result.stderr
    state = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    run_id = state["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert state["completed_epochs"] == 1 and state["finished"] is False and state["global_step"] == steps
    first_epoch = state["epoch_metrics"]
    assert all([s for s, _ in _history(client, run_id, key)] == [0] for key in first_epoch)

    monkeypatch.setattr(task_cls, "train_step", original_step)
    resumed = invoke(["--resume", run_id, "--tracking-uri", uri])
    assert resumed.exit_code == 0, resumed.output
    assert printed_run_id(resumed.stdout) == run_id
    _assert_resumed(client, run_id, first_epoch, run_dir)
    # model, optimizer and estimator state continue from the checkpoint (the interrupted step's updates are gone)
    final = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    assert final["global_step"] == 2 * steps
    _assert_optimizer_steps(final, 2 * steps)
    if case.counter is not None:
        assert int(final["estimator_state"][case.counter]) == 2 * steps


def pause_in_second_epoch(task: str, estimator: str, marker: str, args: list[str]) -> None:
    """Run the CLI with ``args`` in this process; at the first training step of epoch 2, touch ``marker`` and
    sleep (for the parent test to ``SIGKILL`` the process). Used in a subprocess by the test below."""
    torch.set_num_threads(1)

    def pause() -> None:
        Path(marker).touch()
        time.sleep(600)

    task_cls = _task_class(task)
    task_cls.train_step = before_call(  # type: ignore[method-assign]
        task_cls.train_step, _steps_per_epoch(task, estimator) + 1, pause
    )
    main(args)


def test_sigkill_in_epoch_two_then_resume_with_the_console_script(
    data_dir: Path, mlflow_store: MlflowStore, workdir: Path
) -> None:
    task, estimator = "signal", "gumbel"
    uri = mlflow_store.uri
    run_dir = workdir / "killed"
    marker = workdir / "paused"
    args = [*_train_args(task, estimator, data_dir, uri, epochs=2), "--run-dir", str(run_dir)]
    code = (
        "from tests.test_e2e import pause_in_second_epoch; "
        f"pause_in_second_epoch({task!r}, {estimator!r}, {str(marker)!r}, {args!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true", "OMP_NUM_THREADS": "1"}
    exit_status = sigkill_once_file_exists(code, marker, cwd=workdir, env=env, timeout_s=120)
    assert exit_status == -signal.SIGKILL
    state = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    assert state["completed_epochs"] == 1 and state["finished"] is False
    run_id = state["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves no chance to end the run
    first_epoch = state["epoch_metrics"]

    resumed = subprocess.run(
        [str(RUNNER_SCRIPT), "--resume", run_id, "--tracking-uri", uri],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert printed_run_id(resumed.stdout) == run_id
    assert all(math.isfinite(value) for value in _printed_test_metrics(resumed.stdout).values())
    _assert_resumed(client, run_id, first_epoch, run_dir)
    final = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    assert int(final["estimator_state"]["step"]) == final["global_step"] == 2 * state["global_step"]
    _assert_optimizer_steps(final, final["global_step"])
    # exactly one training row per game in both epochs
    assert _history(client, run_id, "decoder_calls") == [(0, EXAMPLES[task]), (1, 2 * EXAMPLES[task])]


# --- configuration errors on the real tasks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "bitvec", "--estimator", "sparsemax"], ["task 'bitvec' cannot use estimator 'sparsemax'"]),
        (["--task", "ssvae", "--estimator", "topksparse"], ["task 'ssvae' cannot use estimator 'topksparse'"]),
        (["--task", "bitvec", "--estimator", "topksparse", "--set", "bits=0"], ["bits", "got 0"]),
        (["--task", "bitvec", "--estimator", "sparsemap", "--set", "budget=40"], ["budget", "bits=32", "got 40"]),
        (["--task", "signal", "--estimator", "gumbel", "--set", "vocab_size=1"], ["vocab_size", ">= 2", "got 1"]),
        (
            ["--task", "bitvec", "--estimator", "topksparse", "--set", "bits=3"],
            ["estimator 'topksparse' does not fit task 'bitvec'", "k=10", "[1, 8]"],
        ),
    ],
    ids=["bitvec-sparsemax", "ssvae-topksparse", "bits0", "budget40", "vocab1", "topk-k-above-2^D"],
)
def test_bad_runs_exit_with_one_line_and_track_nothing(
    args: list[str], expected: list[str], mlflow_store: MlflowStore, workdir: Path
) -> None:
    line = error_line(invoke([*args, "--tracking-uri", mlflow_store.uri, "--data-dir", str(workdir / "no-data")]))
    assert line.startswith("Error: ")
    for fragment in expected:
        assert fragment in line
    client = MlflowClient(mlflow_store.uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    task, estimator = args[1], args[3]
    tracked = client.search_runs(experiments, filter_string=f"tags.task = '{task}' and tags.estimator = '{estimator}'")
    assert [run for run in tracked if run.data.tags.get("lvzoo.run_dir", "").startswith(str(workdir))] == []
    assert not (workdir / "runs").exists()
