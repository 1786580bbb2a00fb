"""Tests of the relaxed estimators (Gumbel-Softmax / binary Concrete and straight-through Gumbel).

Measured gradient bias against the exact gradient, ``||mean - exact|| / ||exact||`` over 20k draws per example
(3 examples, float64, ``QuadraticDecoderLoss``, fixed temperature; the standard error of each number is about
0.004 at tau=1, 0.008 at 0.5 and 0.025 at 0.1):

==================  =========  ===========  ===========  ==============
space               estimator  tau=1.0      tau=0.5      tau=0.1
==================  =========  ===========  ===========  ==============
Categorical(5)      gumbel     0.36 / 0.64  0.17 / 0.38  0.04 / 0.08
Categorical(5)      stgumbel   0.56 / 0.01  0.42 / 0.02  0.33 / 0.02
BitVector(3)        gumbel     0.27 / 0.22  0.11 / 0.15  0.03 / 0.04
BitVector(3)        stgumbel   0.40 / 0.01  0.25 / 0.00  0.14 / 0.01
==================  =========  ===========  ===========  ==============

(score-gradient bias / decoder-gradient bias). Gumbel's bias shrinks with the temperature on this smooth loss;
straight-through keeps a large score-gradient bias, but its decoder gradient is unbiased because its forward
pass evaluates exact samples of pi. Only these qualitative facts are asserted.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lvzoo.estimators.base import LossFn
from lvzoo.estimators.gumbel import GumbelConfig, GumbelSoftmax, StraightThroughGumbel
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from tests.oracle import QuadraticDecoderLoss, gibbs_probs
from tests.test_score_function import (
    EXAMPLES,
    SPACES,
    Z_MAX,
    draw_gradients,
    exact_decoder_gradient,
    make_scores,
    max_z_score,
    seeded_gradient_problem,
)


def fixed_temperature(tau: float) -> GumbelConfig:
    """A schedule that stays at ``tau``."""
    return GumbelConfig(tau0=tau, tau_min=tau, decay_rate=0.0)


def relative_bias(draws: Tensor, exact: Tensor) -> tuple[float, float]:
    """``(||mean - exact|| / ||exact||, its approximate standard error)`` for draws ``[M, ...]``."""
    scale = float(exact.norm())
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    return float((draws.mean(0) - exact).norm()) / scale, float(standard_error.norm()) / scale


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_gumbel_bias_is_detected_and_shrinks_with_temperature(space: LatentSpace) -> None:
    scores, decoder, exact = seeded_gradient_problem(space)
    biases = {}
    for tau in (1.0, 0.5):
        draws, _ = draw_gradients(GumbelSoftmax(space, fixed_temperature(tau)), scores, decoder, 2000, 10)
        assert max_z_score(draws, exact) > Z_MAX  # biased, and the check sees it
        biases[tau] = relative_bias(draws, exact)
    (high, high_se), (low, low_se) = biases[1.0], biases[0.5]
    assert high - low > Z_MAX * math.hypot(high_se, low_se), biases


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_straight_through_has_biased_scores_but_unbiased_decoder_gradients(space: LatentSpace) -> None:
    scores, decoder, exact = seeded_gradient_problem(space)
    estimator = StraightThroughGumbel(space, fixed_temperature(0.5))
    score_draws, decoder_draws = draw_gradients(estimator, scores, decoder, 2000, 10)
    assert max_z_score(score_draws, exact) > Z_MAX
    assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_rows_seen_by_the_loss(space: LatentSpace) -> None:
    """Gumbel passes relaxed rows; ST passes exactly hard rows distributed as pi, with relaxed gradients."""
    replicas = 10000
    scores = make_scores(space).repeat(replicas, 1).requires_grad_(True)
    seen: dict[str, Tensor] = {}

    def record(name: str) -> LossFn:
        def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
            seen[name] = z_rows
            return (z_rows * torch.arange(1.0, space.size + 1, dtype=z_rows.dtype)).sum(-1)

        return loss_fn

    for name, cls in (("gumbel", GumbelSoftmax), ("stgumbel", StraightThroughGumbel)):
        torch.manual_seed(3)
        result = cls(space, fixed_temperature(0.5))(scores, record(name))
        (grad,) = torch.autograd.grad(result.surrogate.sum(), scores)
        assert grad.abs().sum() > 0
    relaxed, hard = seen["gumbel"].detach(), seen["stgumbel"].detach()
    assert ((relaxed > 0) & (relaxed < 1)).float().mean() > 0.99
    assert not torch.all((relaxed == 0) | (relaxed == 1))
    assert torch.all((hard == 0) | (hard == 1))
    if isinstance(space, Categorical):
        torch.testing.assert_close(relaxed.sum(-1), torch.ones(scores.shape[0], dtype=scores.dtype))
        assert torch.all(hard.sum(-1) == 1)
    # same seed, same noise: ST's hard row is the argmax / threshold of the relaxed row
    rounded = relaxed.argmax(-1) if isinstance(space, Categorical) else (relaxed > 0.5).to(relaxed.dtype)
    expected = torch.nn.functional.one_hot(rounded, space.size).to(hard) if isinstance(space, Categorical) else rounded
    assert torch.equal(hard, expected)
    # hard rows follow pi: frequency of each assignment of example 0
    table = space.enumerate().to(scores)
    hits = (hard[0::EXAMPLES].unsqueeze(1) == table.unsqueeze(0)).all(-1).to(scores.dtype)
    assert max_z_score(hits, gibbs_probs(space, scores[:1].detach())[0]) < Z_MAX


def test_temperature_schedule_and_step_counter() -> None:
    config = GumbelConfig(tau0=1.0, tau_min=0.5, decay_rate=1e-3, update_every=100)
    estimator = GumbelSoftmax(Categorical(3), config)
    scores = make_scores(Categorical(3))

    def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
        return z_rows.sum(-1)

    logged = []
    for _ in range(101):
        logged.append(float(estimator(scores, loss_fn).logs["temperature"]))
    assert logged[0] == logged[99] == 1.0
    assert logged[100] == pytest.approx(math.exp(-0.1), rel=1e-6)
    assert int(estimator.step) == 101
    estimator.eval()
    estimator(scores, loss_fn)
    assert int(estimator.step) == 101
    for step, tau in ((250, math.exp(-0.2)), (699, math.exp(-0.6)), (700, 0.5), (10**6, 0.5)):
        estimator.step.fill_(step)
        assert float(estimator.temperature()) == pytest.approx(tau, rel=1e-6)


def test_state_dict_round_trip_restores_the_temperature() -> None:
    space = BitVector(3)
    config = GumbelConfig(decay_rate=1e-2, update_every=2)
    trained = StraightThroughGumbel(space, config).double()
    scores = make_scores(space)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    for _ in range(5):
        trained(scores, decoder)
    fresh = StraightThroughGumbel(space, config).double()
    fresh.load_state_dict(trained.state_dict())
    assert set(trained.state_dict()) == {"step"} and int(fresh.step) == 5
    for estimator in (trained, fresh):
        torch.manual_seed(4)
        estimator.eval()
        result = estimator(scores, decoder)
        assert float(result.logs["temperature"]) == pytest.approx(math.exp(-0.04), rel=1e-6)
    torch.manual_seed(4)
    first = trained(scores, decoder).surrogate
    torch.manual_seed(4)
    assert torch.equal(fresh(scores, decoder).surrogate, first)


def test_config_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"tau0 must be a number > 0, got -1\.0"):
        GumbelConfig(tau0=-1.0)
    with pytest.raises(ValueError, match="tau_min must be a number > 0, got 0"):
        GumbelConfig(tau_min=0)
    with pytest.raises(ValueError, match=r"tau_min must be <= tau0=1.0, got 2.0"):
        GumbelConfig(tau_min=2.0)
    with pytest.raises(ValueError, match=r"decay_rate must be a number >= 0, got -0\.5"):
        GumbelConfig(decay_rate=-0.5)
    with pytest.raises(ValueError, match="update_every must be an int >= 1, got 0"):
        GumbelConfig(update_every=0)
    with pytest.raises(TypeError, match="expects a GumbelConfig"):
        GumbelSoftmax(BitVector(2), object())  # type: ignore[arg-type]
