"""RLOO (the ``leave_one_out`` baseline) and NVIL's variance normalisation (``normalize_signal``).

Unbiasedness of ``rloo`` is checked by the shared tables of :mod:`tests.test_score_function`; here: its baseline
values, configuration errors, its variance against plain multi-sample REINFORCE, and the normalisation's contract
(score gradient unbiased up to the logged positive scale, decoder gradient unbiased, state in buffers).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators.baselines import LeaveOneOutBaseline, SignalNormalizer, make_baseline
from lvzoo.estimators.score_function import (
    NVIL,
    RLOO,
    NVILConfig,
    RLOOConfig,
    ScoreFunction,
    ScoreFunctionConfig,
    SFEConfig,
)
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from tests.oracle import QuadraticDecoderLoss, exact_expectation, gibbs_probs
from tests.test_score_function import (
    EXAMPLES,
    SPACES,
    Z_MAX,
    draw_gradients,
    exact_decoder_gradient,
    fixed_baseline_sfe,
    make_scores,
    max_z_score,
    seeded_gradient_problem,
    total_variance,
)


def test_rloo_is_registered_with_four_samples() -> None:
    assert registry.estimators.load("rloo") is RLOO
    config = RLOOConfig()
    assert (config.sampler, config.samples, config.baseline) == ("plain", 4, "leave_one_out")


def test_leave_one_out_values() -> None:
    losses = torch.tensor([[1.0, 2.0, 6.0], [0.0, 3.0, 3.0]], dtype=torch.float64)
    value = LeaveOneOutBaseline(3)(losses, losses[:, :0], None, None)
    expected = torch.tensor([[4.0, 3.5, 1.5], [3.0, 1.5, 1.5]], dtype=torch.float64)
    torch.testing.assert_close(value.value, expected)
    torch.testing.assert_close(value.logs["baseline"], expected.mean())
    with pytest.raises(ValueError, match="expected losses of 3 samples"):
        LeaveOneOutBaseline(3)(losses[:, :2], losses[:, :0], None, None)


def test_leave_one_out_needs_two_samples() -> None:
    for build in (
        lambda: RLOOConfig(samples=1),
        lambda: ScoreFunctionConfig(baseline="leave_one_out"),
        lambda: make_baseline("leave_one_out", decay=0.9, hidden_sizes=(), samples=1),
        lambda: LeaveOneOutBaseline(1),
    ):
        with pytest.raises(ValueError, match=r"samples >= 2.*got samples=1"):
            build()
    with pytest.raises(ValueError, match="samples must be an int >= 1, got 0"):
        RLOOConfig(samples=0)
    with pytest.raises(ValueError, match=r"accepted: .*leave_one_out"):
        make_baseline("loo", decay=0.9, hidden_sizes=())


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_rloo_variance_against_plain_reinforce(space: LatentSpace) -> None:
    """Total score-gradient variance, loss offset +3, 4 samples each: plain REINFORCE (b = 0) / RLOO measured
    Categorical(5) 9.2, BitVector(3) 19.5; asserted > 4."""
    torch.manual_seed(0)
    scores = make_scores(space, scale=2.0)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)

    def variance(config: ScoreFunctionConfig) -> float:
        draws, _ = draw_gradients(ScoreFunction(space, config), scores, decoder, replicas=6000, groups=1, offset=3.0)
        return total_variance(draws)

    ratio = variance(ScoreFunctionConfig(samples=4, baseline="none")) / variance(RLOOConfig())
    assert ratio > 4, ratio


# --- NVIL's variance normalisation -------------------------------------------------------------------------------


def frozen_normalized(space: LatentSpace, variance: float, **config: object) -> ScoreFunction:
    """An eval-mode score-function estimator with ``normalize_signal`` whose running variance is frozen."""
    estimator = fixed_baseline_sfe(space, 1.3, normalize_signal=True, **config)
    assert isinstance(estimator.normalizer, SignalNormalizer)
    estimator.normalizer.variance.fill_(variance)
    estimator.normalizer.updates.fill_(1)
    return estimator


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_normalized_score_gradient_is_the_exact_one_over_the_scale(space: LatentSpace) -> None:
    """Running variance 6.25 -> scale 2.5: the mean score gradient is exact / 2.5 (z-score), so its direction is the
    exact one (cosine ~ 1); the unscaled exact gradient is rejected; the decoder gradient is unscaled and unbiased."""
    scores, decoder, exact = seeded_gradient_problem(space)
    estimator = frozen_normalized(space, 6.25)
    score_draws, decoder_draws = draw_gradients(estimator, scores, decoder, replicas=2000, groups=10)
    assert max_z_score(score_draws, exact / 2.5) < Z_MAX
    assert max_z_score(score_draws, exact) > Z_MAX
    cosine = torch.nn.functional.cosine_similarity(score_draws.mean(0).flatten(), exact.flatten(), dim=0)
    assert cosine > 0.99, cosine
    assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX


def test_small_signals_are_not_amplified_and_the_scale_is_logged() -> None:
    """``max(1, std)``: a running variance of 0.04 leaves the signal as it is (scale 1)."""
    space = Categorical(5)
    scores, decoder, exact = seeded_gradient_problem(space)
    estimator = frozen_normalized(space, 0.04)
    score_draws, _ = draw_gradients(estimator, scores, decoder, replicas=2000, groups=10)
    assert max_z_score(score_draws, exact) < Z_MAX
    result = estimator(scores, decoder)
    assert float(result.logs["signal_scale"]) == 1.0


def test_normalizer_running_variance_updates_in_training_only() -> None:
    normalizer = SignalNormalizer(0.8).double()
    first = torch.tensor([[0.0, 4.0]], dtype=torch.float64)  # variance 4 (around the batch mean)
    second = torch.tensor([[0.0, 2.0], [0.0, 2.0]], dtype=torch.float64)  # variance 1
    out, scale = normalizer(first)
    assert float(scale) == 1.0 and torch.equal(out, first)  # nothing seen yet: scale 1
    assert float(normalizer.variance) == pytest.approx(4.0)  # initialised by the first batch
    out, scale = normalizer(second)
    assert float(scale) == pytest.approx(2.0)
    torch.testing.assert_close(out, second / 2.0)
    assert float(normalizer.variance) == pytest.approx(0.8 * 4.0 + 0.2 * 1.0)
    normalizer.eval()
    normalizer(first * 100)
    assert float(normalizer.variance) == pytest.approx(3.4) and int(normalizer.updates) == 2


def test_normalisation_state_round_trips_and_config() -> None:
    space = BitVector(3)
    scores = make_scores(space)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    trained = ScoreFunction(space, SFEConfig(normalize_signal=True)).double()
    for _ in range(3):
        trained(scores * 3, lambda z, i: decoder(z, i) * 10)
    assert set(trained.state_dict()) == {
        "baseline.value", "baseline.updates", "normalizer.variance", "normalizer.updates"
    }
    fresh = ScoreFunction(space, SFEConfig(normalize_signal=True)).double()
    fresh.load_state_dict(trained.state_dict())
    assert fresh.normalizer is not None and float(fresh.normalizer.variance) > 1.0
    trained.eval()
    fresh.eval()

    def surrogate(estimator: ScoreFunction) -> Tensor:
        torch.manual_seed(4)
        return estimator(scores, decoder).surrogate.detach()

    assert torch.equal(surrogate(fresh), surrogate(trained))
    # off by default: no normalizer, no extra state
    assert ScoreFunction(space).normalizer is None
    assert NVIL(space, NVILConfig(normalize_signal=True, hidden_sizes=(4,))).normalizer is not None
    with pytest.raises(ValueError, match="normalize_signal applies to sampler=plain only"):
        ScoreFunctionConfig(sampler="sum_and_sample", normalize_signal=True)
    with pytest.raises(ValueError, match=r"normalize_decay must be a number in \[0, 1\), got 1"):
        ScoreFunctionConfig(normalize_decay=1)
    with pytest.raises(TypeError, match="normalize_signal"):
        ScoreFunctionConfig(normalize_signal="yes")  # type: ignore[arg-type]


def test_objective_is_untouched_by_normalisation() -> None:
    space = Categorical(5)
    scores = make_scores(space)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    replicas = 10000
    result = frozen_normalized(space, 9.0)(scores.repeat(replicas, 1), lambda z, i: decoder(z, i % EXAMPLES))
    exact = exact_expectation(space, gibbs_probs(space, scores), decoder)
    assert max_z_score(result.objective.reshape(replicas, EXAMPLES), exact) < Z_MAX
