"""The generic runner: CLI validation, an end-to-end toy run, checkpoints, resume, determinism, run status.

All runs train the toy task of ``tests/runner_toy.py`` (64 training points, 4 steps per epoch) and log into
the session's shared MLflow sqlite store.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import lvzoo.registry
from lvzoo.runners import ConfigError, TerminatedError, TrainResult, evaluate_checkpoint, train
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import Callback
from lvzoo.runners.plan import RunPlan, parse_value, plan_run, split_overrides
from lvzoo.runners.plots import SUPPORT_STATISTICS, plot_decoder_calls
from lvzoo.runners.trainer import Trainer, _epoch_metrics, build
from tests.conftest import MlflowStore
from tests.interrupts import sigkill_once_file_exists
from tests.runner_cli import error_line, invoke, printed_run_id
from tests.runner_toy import FEATURES, NUM_CODES, TemperedSoftmax, ToyTask, toy_model

REPO = Path(__file__).resolve().parents[1]
TRAIN_POINTS = 64
STEPS_PER_EPOCH = 4  # 64 points, paper-default batch size 16 of the toy task
EPOCHS = 3


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _assert_same_parameters(left: nn.Module, right: nn.Module) -> None:
    a, b = _parameters(left), _parameters(right)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"parameter {name} differs"


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def _statuses_in(store: MlflowStore, run_dir: Path) -> list[str]:
    """Statuses of the ToyTask runs whose checkpoints live in ``run_dir``."""
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name("ToyTask")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`lvzoo.run_dir` = '{run_dir}'")
    return [run.info.status for run in runs]


@pytest.fixture(scope="module")
def reference(mlflow_store: MlflowStore, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """An uninterrupted 3-epoch run (seed 0) that the resume and determinism tests compare against."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return train(ToyTask, TemperedSoftmax, epochs=EPOCHS, seed=0, tracking_uri=mlflow_store.uri, run_dir=run_dir)


# --- configuration parsing --------------------------------------------------------------------------------------


def test_parse_value_follows_field_types() -> None:
    assert parse_value("3", int | None, "k") == 3
    assert parse_value("none", int | None, "k") is None
    assert parse_value("2.5e-3", float, "k") == 2.5e-3
    assert parse_value("False", bool, "k") is False
    assert parse_value("(4, 5)", tuple[int, ...], "k") == (4, 5)
    assert parse_value("1,x", tuple[int, str], "k") == (1, "x")
    assert parse_value("b", Any, "k") == "b"
    with pytest.raises(ConfigError, match=r"'1\.5' is not an int"):
        parse_value("1.5", int, "task.batch_size")
    with pytest.raises(ConfigError, match=r"accepted values: 'a', 'b'"):
        from typing import Literal

        parse_value("c", Literal["a", "b"], "k")


def test_ambiguous_keys_need_a_prefix() -> None:
    @attrs.frozen
    class Left:
        shared: int = 1

    @attrs.frozen
    class Right:
        shared: float = 1.0

    with pytest.raises(ConfigError, match=r"ambiguous key 'shared': use task\.shared or estimator\.shared"):
        split_overrides({"shared": "2"}, Left, Right)  # type: ignore[arg-type]
    task_config, estimator_values = split_overrides(
        {"task.shared": "2", "estimator.shared": "0.5"}, Left, Right  # type: ignore[arg-type]
    )
    assert isinstance(task_config, Left) and task_config.shared == 2
    assert estimator_values == {"shared": 0.5}


# --- CLI ----------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("toy_plugins")
def test_cli_list_shows_plugins_estimator_spaces_and_fields() -> None:
    result = invoke(["list"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "toy  (default epochs: 2)" in out
    assert "noise: float = 0.1" in out and "hidden: tuple[int, ...] = (8,)" in out
    assert "tempered  (latent spaces: Categorical)" in out
    assert "temperature: float = 1.0" in out
    assert "sparsemax  (latent spaces: Categorical)" in out  # a real built-in through the real registry


@pytest.mark.usefixtures("toy_plugins", "workdir")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "lr=fast"], "bad value for task.lr: 'fast' is not a float"),
        (["--set", "batch_size=0"], "batch_size must be an int >= 1, got 0"),
        (["--set", "temperature=-1"], "temperature must be a number > 0, got -1.0"),
        (["--set", "colour=red"], "unknown key 'colour'; accepted keys: task.batch_size, task.lr"),
        (["--set", "noise"], "--set expects key=value, got 'noise'"),
        (["--set", "bits=true"], "cannot use estimator 'tempered'"),
        (["--epochs", "0"], "epochs must be a positive int, got 0"),
        (["--device", "tpu"], "bad device 'tpu'"),
    ],
)
def test_cli_rejects_bad_configuration_with_one_line(args: list[str], expected: str) -> None:
    line = error_line(invoke(["--task", "toy", "--estimator", "tempered", *args]))
    assert expected in line


@pytest.mark.usefixtures("toy_plugins", "workdir")
def test_cli_unknown_names_list_the_available_ones() -> None:
    line = error_line(invoke(["--task", "toy", "--estimator", "nope"]))
    assert "unknown estimator 'nope'" in line and "sparsemax" in line and "tempered" in line
    line = error_line(invoke(["--task", "nope", "--estimator", "tempered"]))
    assert "unknown task 'nope'" in line and "toy" in line
    line = error_line(invoke(["--estimator", "tempered"]))
    assert "--task and --estimator are required" in line
    line = error_line(invoke(["--task", "toy", "--estimator", "tempered", "--epochs", "two"]))
    assert "'two' is not a valid integer" in line


@pytest.mark.usefixtures("toy_plugins")
def test_cli_trains_resumes_and_evaluates(mlflow_store: MlflowStore, workdir: Path) -> None:
    uri = mlflow_store.uri
    data_dir = workdir / "data"
    result = invoke(
        ["--task", "toy", "--estimator", "tempered", "--epochs", "1", "--tracking-uri", uri,
         "--set", "temperature=2", "--set", "task.noise=0", "--set", "lr=0.01"],
        env={"LVZOO_DATA": str(data_dir)},
    )
    assert result.exit_code == 0, result.output
    run_id = printed_run_id(result.stdout)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["estimator.temperature"] == "2.0"
    assert run.data.params["task.noise"] == "0.0"
    assert run.data.params["task.lr"] == "0.01"  # the user's value wins over the paper default 0.05
    assert run.data.params["task.batch_size"] == "16"  # the paper default fills the unset value
    assert run.data.metrics["estimator_temperature"] == 2.0
    checkpoint = workdir / "runs" / run_id / ckpt.CHECKPOINT_NAME
    assert ckpt.load(checkpoint)["data_dir"] == str(data_dir)

    resumed = invoke(["--resume", run_id, "--epochs", "2", "--tracking-uri", uri])
    assert resumed.exit_code == 0, resumed.output
    assert printed_run_id(resumed.stdout) == run_id
    assert _steps(client, run_id, "train_loss") == [0, 1]
    line = error_line(invoke(["--resume", run_id, "--tracking-uri", uri]))
    assert f"run {run_id} already completed 2 epochs" in line

    evaluated = invoke(["eval", str(checkpoint), "--split", "val"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["loss"] == pytest.approx(client.get_run(run_id).data.metrics["val_loss"], rel=1e-6)
    final = json.loads(invoke(["eval", str(checkpoint), "--final"]).stdout)
    assert final["final_support"] == NUM_CODES


# --- one run end to end ---------------------------------------------------------------------------------------------


def test_run_logs_params_metrics_tags_artifacts(reference: TrainResult, mlflow_store: MlflowStore) -> None:
    client = MlflowClient(mlflow_store.uri)
    run = client.get_run(reference.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "TemperedSoftmax-0"
    assert client.get_experiment(run.info.experiment_id).name == "ToyTask"
    params = run.data.params
    assert params["task.lr"] == "0.05" and params["task.entropy_coef"] == "0.1"  # ToyTask's paper defaults
    assert params["task.hidden"] == "(8,)" and params["estimator.temperature"] == "1.0" and params["seed"] == "0"
    tags = run.data.tags
    assert tags["task"] == "ToyTask" and tags["estimator"] == "TemperedSoftmax" and tags["epochs"] == "3"
    assert tags["lvzoo.run_dir"] == str(reference.run_dir) and "lvzoo_version" in tags

    for key in ("train_loss", "train_objective", "val_loss", "support_mean", "epoch_time_s", "estimator_temperature"):
        history = client.get_metric_history(reference.run_id, key)
        assert sorted(m.step for m in history) == list(range(EPOCHS)), key
        assert all(math.isfinite(m.value) for m in history), key
    # exact marginalization: the step loss is objective - entropy_coef * entropy, averaged over the epoch's steps
    metrics = run.data.metrics
    assert metrics["train_loss"] == pytest.approx(metrics["train_objective"] - 0.1 * metrics["train_entropy"], rel=1e-5)
    calls = sorted(client.get_metric_history(reference.run_id, "decoder_calls"), key=lambda m: m.step)
    # dense marginalization evaluates all K codes of every training point once per epoch
    assert [m.value for m in calls] == [TRAIN_POINTS * NUM_CODES * (epoch + 1) for epoch in range(EPOCHS)]
    assert run.data.metrics["support_median"] == NUM_CODES
    assert run.data.metrics["test_loss"] == pytest.approx(reference.test_metrics["loss"])
    assert [m.step for m in client.get_metric_history(reference.run_id, "test_loss")] == [EPOCHS - 1]

    artifacts = {a.path for a in client.list_artifacts(reference.run_id)}
    assert artifacts == {"config.json", "checkpoints", "plots", "task"}
    assert [a.path for a in client.list_artifacts(reference.run_id, "plots")] == ["plots/decoder_calls.png"]
    assert [a.path for a in client.list_artifacts(reference.run_id, "task")] == ["task/decoder_weight.txt"]
    local = Path(client.download_artifacts(reference.run_id, "config.json", str(reference.run_dir / "download")))
    config = json.loads(local.read_text())
    assert config["task"]["config"]["hidden"] == [8] and config["estimator"]["config"] == {"temperature": 1.0}
    assert run.info.artifact_uri.startswith((mlflow_store.root / "mlruns").as_uri())


def test_checkpoint_holds_the_full_training_state(reference: TrainResult) -> None:
    state = ckpt.load(reference.checkpoint)
    assert state["run_id"] == reference.run_id
    assert state["completed_epochs"] == EPOCHS and state["finished"] is True
    assert state["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert state["decoder_calls"] == EPOCHS * TRAIN_POINTS * NUM_CODES
    # one estimator call per training step and per validation; the checkpoint predates the test evaluation
    assert int(state["estimator_state"]["calls"]) == state["global_step"] + EPOCHS
    assert set(state["rng"]) >= {"python", "numpy", "torch", "shuffle"}
    assert state["task"]["config"]["lr"] == 0.05 and state["estimator"]["config"] == {"temperature": 1.0}
    assert state["optimizer"]["state"], "Adam moments are saved"
    for name, value in reference.model.state_dict().items():
        assert torch.equal(state["model"][name], value), name
    assert state["test_metrics"] == reference.test_metrics


def test_checkpoint_config_json_and_params_are_one_plan_serialization(
    reference: TrainResult, mlflow_store: MlflowStore
) -> None:
    state = ckpt.load(reference.checkpoint)
    plan = RunPlan.from_dict(state)
    assert plan.task_cls is ToyTask and plan.estimator_cls is TemperedSoftmax and plan.epochs == EPOCHS
    assert {key: state[key] for key in plan.to_dict()} == plan.to_dict()
    config = json.loads((reference.run_dir / "config.json").read_text())
    assert config == json.loads(json.dumps(plan.to_dict()))
    assert RunPlan.from_dict(config) == plan  # JSON lists become tuples again
    assert MlflowClient(mlflow_store.uri).get_run(reference.run_id).data.params == plan.to_params()


class _Recorder(Callback):
    """Records every hook call as ``(hook, argument)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_train_begin(self, trainer: Trainer) -> None:
        super().on_train_begin(trainer)
        self.calls.append(("train_begin", trainer.state.completed_epochs))

    def on_epoch_begin(self, epoch: int) -> None:
        self.calls.append(("epoch_begin", epoch))

    def on_batch_end(self, batch: int, loss: torch.Tensor, support: torch.Tensor) -> None:
        assert not loss.requires_grad and support.shape == (16,)
        self.calls.append(("batch_end", batch))

    def on_validation_begin(self, epoch: int) -> None:
        self.calls.append(("validation_begin", epoch))

    def on_epoch_end(self, epoch: int, metrics: Any) -> None:
        assert self.trainer.state.completed_epochs == epoch + 1 and "val_loss" in metrics
        self.calls.append(("epoch_end", epoch))

    def on_test_end(self, metrics: Any) -> None:
        self.calls.append(("test_end", sorted(metrics)))

    def on_train_end(self, metrics: Any) -> None:
        self.calls.append(("train_end", sorted(metrics)))

    def on_train_failed(self, error: BaseException) -> None:
        self.calls.append(("train_failed", str(error)))


def test_trainer_calls_the_hooks_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_run(ToyTask, TemperedSoftmax, {}, epochs=2, seed=0, device="cpu", data_dir=None)
    recorder = _Recorder()
    Trainer(build(plan), plan.epochs, [recorder]).fit()
    epoch = [("batch_end", batch) for batch in range(STEPS_PER_EPOCH)]
    assert recorder.calls == [
        ("train_begin", 0),
        *[call for e in range(2) for call in [("epoch_begin", e), *epoch, ("validation_begin", e), ("epoch_end", e)]],
        ("test_end", ["final_support", "loss"]),
        ("train_end", ["final_support", "loss"]),
    ]
    monkeypatch.setattr(ToyTask, "crash_at_step", 2)
    recorder = _Recorder()
    with pytest.raises(RuntimeError, match="toy crash"):
        Trainer(build(plan), plan.epochs, [recorder]).fit()
    assert recorder.calls[-2:] == [("batch_end", 0), ("train_failed", "toy crash")]


def test_checkpoint_of_an_older_format_is_refused_with_one_line(reference: TrainResult, tmp_path: Path) -> None:
    state = ckpt.load(reference.checkpoint)
    assert state["format"] == 3 and state["support_per_epoch"][0]["support_median"] == NUM_CODES
    for older in (1, 2):  # 1: before resolved configs; 2: before the score-function family's baseline submodule
        state["format"] = older
        old = tmp_path / ckpt.CHECKPOINT_NAME
        ckpt.save_atomic(state, old)
        for args in (["eval", str(old)], ["--resume", str(tmp_path)]):
            line = error_line(invoke(args))
            assert f"checkpoint format {older} is not supported" in line and "reads format 3" in line, args


def test_epoch_support_statistics_feed_the_decoder_calls_plot(tmp_path: Path) -> None:
    # decoder calls per example over an epoch: the 10th / 50th / 90th percentiles and the mean, as the plot draws them
    support = torch.cat([torch.ones(80, dtype=torch.long), torch.arange(1, 21) * 10])  # 80 ones, then 10..200
    metrics = _epoch_metrics({}, support, {}, decoder_calls=7)
    expected = torch.quantile(support.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    assert [metrics[key] for key in ("support_p10", "support_median", "support_p90")] == pytest.approx(expected)
    assert metrics["support_p10"] == 1.0 and metrics["support_p90"] > 10 * metrics["support_median"]
    assert metrics["support_mean"] == pytest.approx(float(support.double().mean()))
    assert metrics["decoder_calls"] == 7 + int(support.sum())
    epochs = [{key: metrics[key] for key in SUPPORT_STATISTICS}] * 3
    path = plot_decoder_calls(epochs, tmp_path / "decoder_calls.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# --- determinism and resume -----------------------------------------------------------------------------------------


def test_same_seed_gives_identical_parameters(reference: TrainResult, mlflow_store: MlflowStore, workdir: Path) -> None:
    again = train(ToyTask, TemperedSoftmax, epochs=EPOCHS, seed=0, tracking_uri=mlflow_store.uri)
    _assert_same_parameters(again.model, reference.model)
    other = train(ToyTask, TemperedSoftmax, epochs=1, seed=1, tracking_uri=mlflow_store.uri)
    first = train(ToyTask, TemperedSoftmax, epochs=1, seed=0, tracking_uri=mlflow_store.uri)
    assert not torch.equal(toy_model(other.model).decoder.weight, toy_model(first.model).decoder.weight)


def test_resume_extends_a_finished_run_like_an_uninterrupted_one(
    reference: TrainResult, mlflow_store: MlflowStore, workdir: Path
) -> None:
    short = train(ToyTask, TemperedSoftmax, epochs=EPOCHS - 1, seed=0, tracking_uri=mlflow_store.uri)
    resumed = train(resume=short.run_id, epochs=EPOCHS, tracking_uri=mlflow_store.uri)
    assert resumed.run_id == short.run_id and resumed.run_dir == short.run_dir
    client = MlflowClient(mlflow_store.uri)
    for key in ("train_loss", "val_loss", "decoder_calls"):
        assert _steps(client, short.run_id, key) == list(range(EPOCHS)), key
    assert client.get_run(short.run_id).info.status == "FINISHED"
    _assert_same_parameters(resumed.model, reference.model)
    _assert_same_parameters(resumed.estimator, reference.estimator)


def test_keyboard_interrupt_marks_killed_and_resume_redoes_the_partial_epoch(
    reference: TrainResult, mlflow_store: MlflowStore, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ToyTask, "interrupt_at_step", STEPS_PER_EPOCH + 2)  # mid-way through the second epoch
    run_dir = workdir / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(ToyTask, TemperedSoftmax, epochs=EPOCHS, seed=0, tracking_uri=mlflow_store.uri, run_dir=run_dir)
    state = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    client = MlflowClient(mlflow_store.uri)
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    assert state["completed_epochs"] == 1 and _steps(client, state["run_id"], "train_loss") == [0]

    monkeypatch.setattr(ToyTask, "interrupt_at_step", None)
    resumed = train(resume=run_dir, tracking_uri=mlflow_store.uri)
    assert resumed.run_id == state["run_id"]
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert _steps(client, resumed.run_id, "train_loss") == list(range(EPOCHS))
    _assert_same_parameters(resumed.model, reference.model)


def test_crash_marks_the_run_failed(mlflow_store: MlflowStore, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ToyTask, "crash_at_step", 2)
    run_dir = workdir / "crashed"
    with pytest.raises(RuntimeError, match="toy crash"):
        train(ToyTask, TemperedSoftmax, epochs=1, tracking_uri=mlflow_store.uri, run_dir=run_dir)
    assert _statuses_in(mlflow_store, run_dir) == ["FAILED"]


def test_sigterm_marks_the_run_killed(
    mlflow_store: MlflowStore, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ToyTask, "sigterm_at_step", 1)
    handler_before = signal.getsignal(signal.SIGTERM)
    run_dir = workdir / "terminated"
    with pytest.raises(TerminatedError):
        train(ToyTask, TemperedSoftmax, epochs=1, tracking_uri=mlflow_store.uri, run_dir=run_dir)
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert _statuses_in(mlflow_store, run_dir) == ["KILLED"]


def test_resume_after_sigkill_continues_the_same_run(mlflow_store: MlflowStore, workdir: Path) -> None:
    epochs, delay = 4, 0.1
    run_dir = workdir / "killed"
    code = (
        "from tests.runner_toy import run_in_subprocess; "
        f"run_in_subprocess({mlflow_store.uri!r}, {str(run_dir)!r}, {epochs}, {delay})"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true"}
    checkpoint = run_dir / ckpt.CHECKPOINT_NAME
    sigkill_once_file_exists(code, checkpoint, cwd=workdir, env=env, timeout_s=180)
    state = ckpt.load(checkpoint)
    assert 1 <= state["completed_epochs"] < epochs
    client = MlflowClient(mlflow_store.uri)
    assert client.get_run(state["run_id"]).info.status == "RUNNING"  # SIGKILL leaves no chance to end the run

    resumed = train(resume=run_dir, tracking_uri=mlflow_store.uri)
    assert resumed.run_id == state["run_id"]
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "decoder_calls"):
        assert _steps(client, resumed.run_id, key) == list(range(epochs)), key
    uninterrupted = train(ToyTask, TemperedSoftmax, epochs=epochs, seed=3, tracking_uri=mlflow_store.uri)
    _assert_same_parameters(resumed.model, uninterrupted.model)


def test_evaluate_checkpoint_reproduces_the_logged_test_metrics(reference: TrainResult) -> None:
    assert evaluate_checkpoint(reference.checkpoint, "test", final=True) == pytest.approx(reference.test_metrics)
    with pytest.raises(ConfigError, match="bad split 'train'; accepted: val, test"):
        evaluate_checkpoint(reference.checkpoint, "train")  # type: ignore[arg-type]


def test_task_instance_and_typed_overrides(mlflow_store: MlflowStore, workdir: Path) -> None:
    from tests.runner_toy import ToyConfig

    instance = ToyTask(ToyConfig(hidden=(5, 6), lr=0.02), None, torch.device("cpu"))
    result = train(instance, TemperedSoftmax, overrides={"noise": 0.0}, epochs=1, tracking_uri=mlflow_store.uri)
    params = MlflowClient(mlflow_store.uri).get_run(result.run_id).data.params
    assert params["task.hidden"] == "(5, 6)" and params["task.lr"] == "0.02" and params["task.noise"] == "0.0"
    model = toy_model(result.model)
    assert [layer.weight.shape for layer in model.encoder if isinstance(layer, nn.Linear)] == [
        (5, FEATURES),
        (6, 5),
        (NUM_CODES, 6),
    ]


class _BrokenEstimator(TemperedSoftmax):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("this plugin is broken")


@pytest.mark.usefixtures("toy_plugins")
def test_a_plugin_failing_at_construction_is_one_line(
    mlflow_store: MlflowStore, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lvzoo.registry.estimators, "load", lambda name: _BrokenEstimator)
    line = error_line(invoke(["--task", "toy", "--estimator", "broken", "--tracking-uri", mlflow_store.uri]))
    assert "estimator 'broken'" in line and "failed at construction: TypeError: this plugin is broken" in line


def test_device_auto_is_the_default_and_resolves() -> None:
    from lvzoo.runners.plan import device_of

    assert device_of("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "[default: auto]" in invoke(["--help"]).stdout
