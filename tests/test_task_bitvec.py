"""The bit-vector VAE task and model: chunked likelihood, importance-sampled NLL against exact enumeration,
ELBO bounds, training steps, evaluation, artifacts and configuration.

Uses the real Fashion-MNIST files when ``<repo>/../shared/data`` holds them, generated uint8 images otherwise.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators.base import (
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    LossFn,
    MarginalizingEstimator,
    SparseDistribution,
    evaluate_rows,
    expectation,
)
from lvzoo.estimators.spaces import BitVector
from lvzoo.estimators.topk import TopKSparsemax, TopKSparsemaxConfig
from lvzoo.models.bitvec import PIXELS, BitVectorVAEModel
from lvzoo.tasks.base import resolve_config
from lvzoo.tasks.bitvec import (
    EVAL_SEED,
    VALIDATION_SIZE,
    BitVectorVAEConfig,
    BitVectorVAETask,
    as_bitvec_model,
    distortion_fn,
)
from lvzoo.tasks.bitvec_nll import (
    bernoulli_entropy,
    bernoulli_importance_samples,
    log_mean_exp,
    sparse_log_marginal_terms,
)
from lvzoo.tasks.data import load_images
from tests.datasets import SHARED_DATA, shared_or_random_root

TINY_BITS = 4
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real data root, or a generated Fashion-MNIST-shaped one (300 train + 5000 validation, 100 test)."""
    return shared_or_random_root(tmp_path_factory, {"FashionMNIST": (300 + VALIDATION_SIZE, 100)})


@pytest.fixture(scope="module")
def images(data_dir: Path) -> Tensor:
    """The first 8 training images, uint8 ``[8, 784]``."""
    train, _ = load_images("FashionMNIST", "train", data_dir)
    return train[:8].reshape(-1, PIXELS)


def _tiny_model(seed: int = 0) -> BitVectorVAEModel:
    torch.manual_seed(seed)
    return BitVectorVAEModel(TINY_BITS, hidden=32, chunk_rows=64).double()


def _exact_log_marginal(model: BitVectorVAEModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p(x) [B], log p(x|z) [B, 2^D])`` by enumerating every z (uniform prior)."""
    table = BitVector(model.bits).enumerate().to(next(model.parameters()).dtype)
    batch, count = x.shape[0], table.shape[0]
    with torch.no_grad():
        log_likelihood = model.log_likelihood(table.repeat(batch, 1), x.repeat_interleave(count, 0))
    log_likelihood = log_likelihood.reshape(batch, count)
    return torch.logsumexp(log_likelihood, -1) - model.bits * LOG2, log_likelihood


def _task(data_dir: Path, estimator: str = "topksparse", **config: Any) -> BitVectorVAETask:
    """The task configured for ``estimator`` as the runner resolves it (paper settings, then ``config``)."""
    settings: dict[str, Any] = {"bits": 8, "train_limit": 96, "eval_limit": 12, "is_samples": 4}
    settings.update(config)
    resolved, _ = resolve_config(BitVectorVAETask, estimator, settings)
    return BitVectorVAETask(resolved, data_dir, torch.device("cpu"))


def _estimator(task: BitVectorVAETask, name: str = "topksparse") -> Any:
    cls = registry.estimators.load(name)
    config = cls.config_class(**BitVectorVAETask.paper_settings(name, task.config).estimator)
    return cls(task.latent_space(), config)


# -- registration --------------------------------------------------------------------------------------------


def test_task_and_model_are_registered() -> None:
    assert registry.tasks.load("bitvec") is BitVectorVAETask
    assert registry.models.load("bitvec") is BitVectorVAEModel


# -- likelihood ---------------------------------------------------------------------------------------------


def test_chunked_likelihood_equals_naive_log_softmax_values_and_gradients(images: Tensor) -> None:
    torch.manual_seed(1)
    model = BitVectorVAEModel(TINY_BITS, hidden=16, chunk_rows=3).double()
    rows = 7  # not a multiple of the chunk
    z = torch.rand(rows, TINY_BITS, dtype=torch.float64, requires_grad=True)  # relaxed rows (Gumbel) too
    x = images[torch.arange(rows) % images.shape[0]]

    def naive() -> Tensor:
        logits = model.pixel_output(model.pixel_features(z))  # [R, 784, 256]
        return F.log_softmax(logits, -1).gather(-1, x.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    params = [z, *model.decoder.parameters(), *model.pixel_output.parameters()]
    upstream = torch.randn(rows, dtype=torch.float64)
    chunked_value = model.log_likelihood(z, x)
    chunked_grads = torch.autograd.grad((chunked_value * upstream).sum(), params)
    naive_value = naive()
    naive_grads = torch.autograd.grad((naive_value * upstream).sum(), params)
    torch.testing.assert_close(chunked_value, naive_value, rtol=1e-10, atol=1e-8)
    for chunked, reference in zip(chunked_grads, naive_grads, strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-9, atol=1e-9)


def test_likelihood_does_not_depend_on_the_chunk_size(images: Tensor) -> None:
    model = _tiny_model()
    z = torch.randint(0, 2, (images.shape[0], TINY_BITS)).double()
    values = []
    for chunk in (1, 3, 64):
        model.chunk_rows = chunk
        values.append(model.log_likelihood(z, images))
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(values[0], values[2], rtol=1e-12, atol=1e-9)


# -- importance-sampled NLL against exact enumeration --------------------------------------------------------


def _assert_unbiased(point_mass: Tensor, ratios: Tensor) -> None:
    """``point_mass [B] + mean(ratios [B, M])`` estimates 1 per example: check within 5 standard errors."""
    mean = point_mass + ratios.mean(-1)
    standard_error = ratios.std(-1) / math.sqrt(ratios.shape[-1])
    assert bool((standard_error < 0.5).all()), standard_error  # the check below is informative
    assert bool(((mean - 1).abs() <= 5 * standard_error + 1e-9).all()), (mean, standard_error)


def test_bernoulli_importance_sampling_matches_exact_marginal(images: Tensor) -> None:
    model = _tiny_model()
    x = images[:2]
    exact, log_likelihood_table = _exact_log_marginal(model, x)
    scores = model.encode(x).detach()
    generator = torch.Generator().manual_seed(0)
    log_likelihood, log_weights = bernoulli_importance_samples(model, scores, x, 256, generator, pass_rows=200)
    assert log_weights.shape == (2, 256)
    # p(x) = E_q[w] exactly: the normalized weights average to 1
    _assert_unbiased(torch.zeros(2, dtype=torch.float64), torch.exp(log_weights - exact.unsqueeze(1)))
    # the log-mean-exp estimate is close to the exact log-marginal
    assert bool(((log_mean_exp(log_weights, -1) - exact).abs() < 0.5).all())
    # every sampled log-likelihood is one of the enumerated ones
    assert bool(torch.isclose(log_likelihood.unsqueeze(-1), log_likelihood_table.unsqueeze(1)).any(-1).all())


def test_sparse_split_estimate_matches_exact_marginal(images: Tensor) -> None:
    model = _tiny_model()
    x = images[:2]
    exact, _ = _exact_log_marginal(model, x)
    scores = model.encode(x).detach()
    estimator = TopKSparsemax(BitVector(TINY_BITS), TopKSparsemaxConfig(k=5))
    posterior = estimator.distribution(scores)
    losses = evaluate_rows(distortion_fn(model, x), posterior.z_rows, posterior.example_index)
    generator = torch.Generator().manual_seed(1)
    support_term, complement = sparse_log_marginal_terms(model, posterior, -losses, x, 256, generator, pass_rows=200)
    # samples landing in the support count zero: about |S| / 2^D of them
    in_support = torch.isinf(complement).double().mean(-1)
    support_size = torch.bincount(posterior.example_index, minlength=2).double()
    expected = support_size / 2**TINY_BITS
    assert bool(((in_support - expected).abs() <= 5 * torch.sqrt(expected * (1 - expected) / 256)).all())
    _assert_unbiased(torch.exp(support_term - exact), torch.exp(complement - exact.unsqueeze(1)))
    estimate = torch.logaddexp(support_term, log_mean_exp(complement, -1))
    assert bool(((estimate - exact).abs() < 0.5).all())


def test_sparse_split_estimate_is_exact_when_the_support_covers_every_vector(images: Tensor) -> None:
    model = _tiny_model()
    x = images[:2]
    exact, log_likelihood_table = _exact_log_marginal(model, x)
    table = BitVector(TINY_BITS).enumerate().double()
    count = table.shape[0]
    everything = SparseDistribution(
        z_rows=table.repeat(2, 1),
        example_index=torch.arange(2).repeat_interleave(count),
        probs=torch.full((2 * count,), 1.0 / count, dtype=torch.float64),
        num_examples=2,
    )
    support_term, complement = sparse_log_marginal_terms(
        model, everything, log_likelihood_table.reshape(-1), x, 32, torch.Generator().manual_seed(2), 20
    )
    assert bool(torch.isneginf(complement).all())
    torch.testing.assert_close(torch.logaddexp(support_term, log_mean_exp(complement, -1)), exact)


# -- ELBO ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator_name", ["topksparse", "sparsemap"])
def test_sparse_neg_elbo_bounds_the_exact_nll(images: Tensor, estimator_name: str) -> None:
    model = _tiny_model()
    x = images[:4]
    exact, _ = _exact_log_marginal(model, x)
    estimator = registry.estimators.load(estimator_name)(BitVector(TINY_BITS))
    assert isinstance(estimator, MarginalizingEstimator)
    dist = estimator.distribution(model.encode(x).detach())
    losses = evaluate_rows(distortion_fn(model, x), dist.z_rows, dist.example_index)
    result = expectation(dist, losses)
    neg_elbo = result.objective + TINY_BITS * LOG2 - result.entropy
    assert bool((neg_elbo >= -exact - 1e-9).all())
    # the same -ELBO written as sum_z q(z) [-log p(x|z) - log p(z) + log q(z)]
    plogq = dist.probs * (losses + TINY_BITS * LOG2 + torch.log(dist.probs))
    recomputed = torch.zeros(4, dtype=torch.float64).index_add(0, dist.example_index, plogq)
    torch.testing.assert_close(neg_elbo, recomputed)


def test_bernoulli_neg_elbo_bounds_the_exact_nll(images: Tensor) -> None:
    model = _tiny_model()
    x = images[:4]
    exact, log_likelihood_table = _exact_log_marginal(model, x)
    scores = model.encode(x).detach()
    table = BitVector(TINY_BITS).enumerate().double()
    log_q = (table * F.logsigmoid(scores).unsqueeze(1) + (1 - table) * F.logsigmoid(-scores).unsqueeze(1)).sum(-1)
    q = log_q.exp()
    torch.testing.assert_close(bernoulli_entropy(scores), -(q * log_q).sum(-1))
    neg_elbo = -(q * log_likelihood_table).sum(-1) + TINY_BITS * LOG2 - bernoulli_entropy(scores)
    assert bool((neg_elbo >= -exact - 1e-9).all())


# -- which evaluation an estimator gets -------------------------------------------------------------------------


class _EnumeratedBernoulli(MarginalizingEstimator[EstimatorConfig]):
    """A plugin-style exact estimator: every one of the ``2^D`` vectors, weighted by the factorised Bernoulli."""

    supported_spaces = (BitVector,)

    def distribution(self, scores: Tensor) -> SparseDistribution:
        table = BitVector(scores.shape[1]).enumerate().to(scores.dtype)  # [2^D, D]
        batch, count = scores.shape[0], table.shape[0]
        log_q = table @ F.logsigmoid(scores).T + (1 - table) @ F.logsigmoid(-scores).T  # [2^D, B]
        return SparseDistribution(
            z_rows=table.repeat(batch, 1),
            example_index=torch.arange(batch).repeat_interleave(count),
            probs=log_q.T.exp().reshape(-1),
            num_examples=batch,
        )


class _DoubledLoss(Estimator[EstimatorConfig]):
    """Not a marginalization: the surrogate is twice the loss of the MAP row."""

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        index = torch.arange(scores.shape[0])
        losses = loss_fn((scores > 0).to(scores.dtype), index)
        return EstimatorResult(
            surrogate=2 * losses,
            objective=losses.detach(),
            entropy=torch.zeros_like(losses),
            support=torch.ones_like(index),
        )


def _tiny_task(data_dir: Path) -> BitVectorVAETask:
    """``D = TINY_BITS``, all 12 validation images in one evaluation batch."""
    return _task(data_dir, "plugin", bits=TINY_BITS, eval_batch_size=12, is_pass_rows=64)


def _count_decoder_rows(model: BitVectorVAEModel) -> list[int]:
    """Record the number of rows of every ``model.log_likelihood`` call (the list is filled as calls happen)."""
    calls: list[int] = []
    log_likelihood = model.log_likelihood

    def counting(z: Tensor, x: Tensor) -> Tensor:
        calls.append(z.shape[0])
        return log_likelihood(z, x)

    model.log_likelihood = counting  # type: ignore[method-assign, assignment]
    return calls


def test_a_plugin_marginalizing_estimator_is_evaluated_exactly_on_its_support(data_dir: Path) -> None:
    task = _tiny_task(data_dir)
    torch.manual_seed(0)
    model = as_bitvec_model(task.build_model())
    images = task._data()["val"]
    exact, log_likelihood_table = _exact_log_marginal(model, images)
    calls = _count_decoder_rows(model)
    metrics = task.evaluate(model, _EnumeratedBernoulli(task.latent_space()), "val")
    count, samples = 2**TINY_BITS, task.config.is_samples
    # the support rows are decoded once (distortion, entropy and support term share them), then the prior samples
    assert sum(calls) == images.shape[0] * (count + samples)
    assert metrics["decoder_calls"] == metrics["decoder_calls_median"] == count
    # S covers every vector: the split estimate is exact, the prior samples all count zero
    assert metrics["nll"] == pytest.approx(float(-exact.mean()), rel=1e-5)
    with torch.no_grad():
        scores = model.encode(images)
    entropy = bernoulli_entropy(scores)
    q = _EnumeratedBernoulli(task.latent_space()).distribution(scores).probs.reshape(-1, count)
    distortion = -(q * log_likelihood_table).sum(-1)
    assert metrics["rate"] == pytest.approx(float((TINY_BITS * LOG2 - entropy).mean()), rel=1e-4, abs=1e-5)
    assert metrics["distortion"] == pytest.approx(float(distortion.mean()), rel=1e-5)


def test_a_non_marginalizing_estimator_gets_bernoulli_importance_sampling(data_dir: Path) -> None:
    task = _tiny_task(data_dir)
    torch.manual_seed(0)
    model = as_bitvec_model(task.build_model())
    images = task._data()["val"]
    metrics = task.evaluate(model, _DoubledLoss(task.latent_space()), "val")
    with torch.no_grad():
        scores = model.encode(images)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        log_likelihood, log_weights = bernoulli_importance_samples(
            model, scores, images, task.config.is_samples, generator, task.config.is_pass_rows
        )
    assert metrics["decoder_calls"] == 1.0
    assert metrics["nll"] == pytest.approx(float(-log_mean_exp(log_weights, -1).mean()), rel=1e-6)
    assert metrics["distortion"] == pytest.approx(float(-log_likelihood.mean()), rel=1e-6)
    expected_rate = float((TINY_BITS * LOG2 - bernoulli_entropy(scores)).mean())
    assert metrics["rate"] == pytest.approx(expected_rate, rel=1e-5, abs=1e-6)


# -- the task end to end -------------------------------------------------------------------------------------


def test_splits_follow_the_papers_code(data_dir: Path) -> None:
    task = _task(data_dir, train_limit=None, eval_limit=None)
    train_file, _ = load_images("FashionMNIST", "train", data_dir)
    test_file, _ = load_images("FashionMNIST", "test", data_dir)
    flat = train_file.reshape(-1, PIXELS)
    splits = task._data()
    assert splits["train"].dtype == torch.uint8
    assert torch.equal(splits["train"], flat[:-VALIDATION_SIZE])
    assert torch.equal(splits["val"], flat[-VALIDATION_SIZE:])
    assert torch.equal(splits["test"], test_file.reshape(-1, PIXELS))
    if data_dir == SHARED_DATA:
        assert splits["train"].shape[0] == 55_000 and splits["test"].shape[0] == 10_000


def test_train_batches_cover_the_training_split_once(data_dir: Path) -> None:
    task = _task(data_dir, batch_size=40)
    batches = list(task.train_batches(torch.Generator().manual_seed(0)))
    assert len(batches) == task.steps_per_epoch() == 3
    seen = torch.cat(batches)
    assert seen.shape == (96, PIXELS) and seen.dtype == torch.uint8
    assert sorted(map(bytes, seen.numpy())) == sorted(map(bytes, task._data()["train"].numpy()))


def test_training_steps_with_topksparse_give_finite_loss_and_gradients(data_dir: Path) -> None:
    task = _task(data_dir, batch_size=8)
    torch.manual_seed(0)
    model = task.build_model()
    estimator = _estimator(task)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.config.lr)
    for batch in itertools.islice(task.train_batches(torch.Generator().manual_seed(0)), 2):
        optimizer.zero_grad()
        step = task.train_step(model, estimator, batch)
        torch.autograd.backward(step.loss)
        assert bool(torch.isfinite(step.loss))
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), name
        optimizer.step()
    # the task's own metrics; the loop computes the loss, support and estimator-log metrics itself
    assert set(step.metrics) == {"neg_elbo", "rate", "distortion", "entropy"}
    for key, value in step.metrics.items():
        assert bool(torch.isfinite(value)) and not value.requires_grad, key
    assert step.support.shape == (8,)
    assert bool((step.support >= 1).all() and (step.support <= 10).all())
    # with entropy_coef 1 the loss is the -ELBO (top-k marginalization is exact)
    torch.testing.assert_close(step.loss.detach(), step.metrics["neg_elbo"])
    assert float(step.metrics["rate"]) <= 8 * LOG2 + 1e-5


@pytest.mark.parametrize("estimator_name", ["topksparse", "sfe"])
def test_evaluate_returns_finite_metrics(data_dir: Path, estimator_name: str) -> None:
    task = _task(data_dir, estimator_name, eval_batch_size=5, is_pass_rows=16)
    torch.manual_seed(0)
    model = task.build_model()
    estimator = _estimator(task, estimator_name)
    metrics = task.evaluate(model, estimator, "val")
    assert set(metrics) == {
        "neg_elbo", "rate", "distortion", "nll", "bits_per_dim", "decoder_calls", "decoder_calls_median"
    }
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert metrics["neg_elbo"] == pytest.approx(metrics["rate"] + metrics["distortion"])
    assert metrics["bits_per_dim"] == pytest.approx(metrics["nll"] / (PIXELS * LOG2))
    assert 0 <= metrics["rate"] <= 8 * LOG2 + 1e-4
    assert model.training and estimator.training  # modes restored
    assert task.evaluate(model, estimator, "val") == metrics  # seeded importance samples


def test_save_artifacts_writes_a_png(data_dir: Path, tmp_path: Path) -> None:
    task = _task(data_dir)
    torch.manual_seed(0)
    paths = task.save_artifacts(task.build_model(), _estimator(task), tmp_path)
    assert paths == [tmp_path / "reconstructions.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- configuration and defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bits": 0}, "bits must be an int >= 1, got 0"),
        ({"bits": -4}, "bits must be an int >= 1, got -4"),
        ({"bits": 32, "budget": 33}, r"budget must be None or an int in \[1, bits=32\], got 33"),
        ({"bits": 8, "budget": 0}, r"budget must be None or an int in \[1, bits=8\], got 0"),
        ({"is_samples": 0}, "is_samples must be an int >= 1, got 0"),
        ({"likelihood_chunk": -1}, "likelihood_chunk must be an int >= 1, got -1"),
    ],
)
def test_config_validators_name_the_bad_value(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BitVectorVAEConfig(**settings)


def test_paper_settings_follow_the_papers_table() -> None:
    cpu = torch.device("cpu")

    def config(name: str, **values: Any) -> BitVectorVAEConfig:
        return resolve_config(BitVectorVAETask, name, values)[0]

    def estimator_values(name: str, **values: Any) -> dict[str, Any]:
        return resolve_config(BitVectorVAETask, name, values)[1]

    assert config("topksparse").lr == 2e-3 and estimator_values("topksparse") == {"k": 10}
    assert config("topksparse", bits=128).lr == 1e-3
    assert config("sparsemap").batch_size == 64 and config("sparsemap", bits=128, budget=64).batch_size == 16
    assert estimator_values("stgumbel", bits=128) == {"decay_rate": 1e-5, "update_every": 1000}
    assert estimator_values("gumbel", bits=128) == {"decay_rate": 1e-4, "update_every": 1000}
    assert config("nvil", bits=128).lr == 5e-4 and config("nvil").lr == 1e-3
    assert all(config(name).entropy_coef == 1.0 for name in ("sfe", "sfe+", "nvil", "sparsemap"))
    assert config("sparsemap", bits=128, batch_size=32).batch_size == 32  # the user's value wins
    assert (config("plugin").lr, estimator_values("plugin")) == (1e-3, {})  # outside the paper's table
    task = BitVectorVAETask(BitVectorVAEConfig(bits=32, budget=16), None, cpu)
    assert task.latent_space() == BitVector(32, 16)
    assert BitVectorVAETask.default_epochs == 100
