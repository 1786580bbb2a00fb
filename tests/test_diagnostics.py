"""Gradient diagnostics are right: the exact reference is the oracle's gradient, an unbiased estimator's reported
bias is within its standard error of zero while a relaxation's is not, and the reported variance, cosines and SNR are
the direct computations from the draws."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lvzoo.estimators.diagnostics import diagnose, exact_reference, monte_carlo_reference
from lvzoo.estimators.gumbel import GumbelSoftmax
from lvzoo.estimators.indecater import IndeCateR
from lvzoo.estimators.marginal import SparsemaxMarginal
from lvzoo.estimators.score_function import RLOO, SelfCriticSFE
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from tests.oracle import QuadraticDecoderLoss, exact_gradient, gibbs_probs
from tests.runner_cli import error_line, invoke

SPACES: list[LatentSpace] = [Categorical(5), BitVector(4)]
EXAMPLES = 3


def problem(space: LatentSpace) -> tuple[torch.Tensor, QuadraticDecoderLoss]:
    scores = torch.randn(EXAMPLES, space.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return scores, QuadraticDecoderLoss(space, EXAMPLES)


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_exact_reference_is_the_oracle_gradient(space: LatentSpace) -> None:
    scores, loss = problem(space)
    oracle = exact_gradient(space, scores, lambda s: gibbs_probs(space, s), loss)
    torch.testing.assert_close(exact_reference(space, scores, loss).detach(), oracle.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_unbiased_within_its_error_biased_not(space: LatentSpace) -> None:
    scores, loss = problem(space)
    torch.manual_seed(0)
    unbiased, raw = diagnose(SelfCriticSFE(space), scores, loss, draws=400)
    draws, reference = raw.draws, raw.reference
    assert unbiased.reference == "exact" and unbiased.bias_z < 3.0  # measured 1.2 (K5), 0.9 (D4)
    relaxed, _ = diagnose(GumbelSoftmax(space), scores, loss, draws=400)
    assert relaxed.bias_z > 5.0  # measured 11.0 (K5), 11.4 (D4): the relaxation's bias, far beyond its noise

    flat = draws.reshape(draws.shape[0], -1)
    target = reference.reshape(-1)
    assert unbiased.variance == pytest.approx(float(flat.var(0).sum()), rel=1e-12)
    mean = flat.mean(0)
    assert unbiased.bias_norm == pytest.approx(float((mean - target).norm()), rel=1e-12)
    assert unbiased.cosine_mean == pytest.approx(float(torch.cosine_similarity(mean, target, dim=0)), rel=1e-9)
    single = torch.cosine_similarity(flat, target.expand_as(flat), dim=1).mean()
    assert unbiased.cosine_single == pytest.approx(float(single), rel=1e-9)
    assert unbiased.snr == pytest.approx(float(mean.norm() / flat.var(0).sum().sqrt()), rel=1e-9)
    assert unbiased.rows_per_example == 2.0


def test_marginalizing_estimators_are_their_own_exact_reference() -> None:
    space = Categorical(5)
    scores, loss = problem(space)
    diagnosis, _ = diagnose(SparsemaxMarginal(space), scores, loss, draws=50)
    assert diagnosis.reference == "own" and diagnosis.draws == 1
    assert diagnosis.bias_norm == 0.0 and diagnosis.variance == 0.0 and diagnosis.cosine_mean == pytest.approx(1.0)


def test_monte_carlo_reference_when_enumeration_is_too_large() -> None:
    space = BitVector(16)
    scores, loss = problem(space)
    torch.manual_seed(0)
    diagnosis, raw = diagnose(RLOO(space), scores, loss, draws=100, reference_draws=100, reference_samples=16)
    assert raw.reference_draws is not None and raw.reference_draws.shape == (100, EXAMPLES, 16)
    assert diagnosis.reference == "monte-carlo" and diagnosis.bias_z < 3.0
    mean, draws = monte_carlo_reference(space, scores, loss, draws=10, samples=4)
    torch.testing.assert_close(mean, draws.mean(0))


@pytest.mark.usefixtures("toy_plugins")
def test_runner_diagnose_prints_the_table_and_tracks_it(mlflow_store: object, workdir: Path) -> None:
    uri = mlflow_store.uri  # type: ignore[attr-defined]
    result = invoke(["diagnose", "--task", "toy", "--estimators", "softmax,sfe+,gumbel", "--draws", "20",
                     "--batches", "2", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "estimator" not in line]
    assert [row.split(" | ")[0].strip("| ") for row in table] == ["softmax", "sfe+", "gumbel"]
    assert [row.split(" | ")[1] for row in table] == ["own", "exact", "exact"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy-diagnose")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = run.data.metrics
    assert metrics["softmax.variance"] == 0.0 and metrics["sfe_plus.rows_per_example"] == 2.0
    assert math.isfinite(metrics["gumbel.bias_z"]) and metrics["sfe_plus.variance"] > 0
    assert metrics["sfe_plus.encoder_variance"] > 0 and metrics["softmax.encoder_variance"] == 0.0
    assert metrics["softmax.encoder_cosine_mean"] == pytest.approx(1.0)
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"diagnose.md", "diagnose.csv", "diagnose.png"} <= artifacts

    line = error_line(invoke(["diagnose", "--task", "toy", "--estimators", "nosuch", "--tracking-uri", uri]))
    assert "unknown estimator 'nosuch'" in line
    line = error_line(invoke(["diagnose", "--task", "toy", "--estimators", "sfe,disarm", "--tracking-uri", uri]))
    assert "task 'toy' cannot use estimator 'disarm'" in line and "supports: BitVector" in line


@pytest.mark.usefixtures("toy_plugins")
def test_diagnose_every_logs_during_training_and_changes_nothing(mlflow_store: object, workdir: Path) -> None:
    from lvzoo.runners import train

    uri = mlflow_store.uri  # type: ignore[attr-defined]
    args: dict[str, object] = {"epochs": 2, "seed": 3, "tracking_uri": uri, "progress": False}
    watched = train("toy", "sfe+", overrides={"diagnose_every": 3}, **args)  # type: ignore[arg-type]
    plain = train("toy", "sfe+", **args)  # type: ignore[arg-type]
    client = MlflowClient(uri)
    history = client.get_metric_history(watched.run_id, "diagnose_bias_z")
    assert [metric.step for metric in history] == [3, 6]  # 4 steps per epoch, 2 epochs
    assert all(math.isfinite(metric.value) for metric in history)
    assert client.get_metric_history(watched.run_id, "diagnose_rows_per_example")[0].value == 2.0
    assert "diagnose_variance" not in client.get_run(plain.run_id).data.metrics
    for name, value in plain.model.state_dict().items():  # the diagnostics leave the training stream untouched
        assert torch.equal(watched.model.state_dict()[name], value), name


def test_a_stochastic_row_loss_gets_an_averaged_exact_reference() -> None:
    """Like the ssVAE's sampled h: every loss call adds fresh noise; the reference then averages exact evaluations
    and its own noise enters the standard error, so unbiased estimators stay near 1 SE."""
    space = Categorical(5)
    scores, loss = problem(space)

    def noisy(z_rows: torch.Tensor, example_index: torch.Tensor) -> torch.Tensor:
        value: torch.Tensor = loss(z_rows, example_index)
        return value + 0.5 * torch.randn_like(value)

    torch.manual_seed(0)
    for estimator in (IndeCateR(space), SelfCriticSFE(space)):
        diagnosis, raw = diagnose(estimator, scores, noisy, draws=200)
        assert diagnosis.reference == "exact-mean" and raw.reference_draws is not None
        assert diagnosis.bias_z < 3.0, (type(estimator).__name__, diagnosis.bias_z)
