"""Statistical and contract tests of the score-function estimators (SFE, SFE+, NVIL, RLOO, Sum&Sample).

Unbiasedness: the batch is replicated so one forward gives thousands of independent draws; the mean per-draw
gradient w.r.t. the scores (and the mean per-group gradient w.r.t. the decoder parameters) must match the
exact-enumeration gradient within ``Z_MAX`` standard errors, measured from the draws themselves. The same check
must reject deliberately biased variants, so it has power.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from lvzoo.estimators.base import Estimator, EstimatorResult, IncompatibleSpaceError, LossFn, evaluate_rows
from lvzoo.estimators.baselines import MovingAverageBaseline
from lvzoo.estimators.distributions import SamplingEstimator
from lvzoo.estimators.gumbel import GumbelSoftmax, StraightThroughGumbel
from lvzoo.estimators.score_function import (
    NVIL,
    RLOO,
    SFE,
    NVILConfig,
    RLOOConfig,
    ScoreFunction,
    ScoreFunctionConfig,
    SelfCriticSFE,
    SFEConfig,
    SumAndSample,
    SumAndSampleConfig,
)
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from tests.oracle import QuadraticDecoderLoss, exact_expectation, exact_gradient, gibbs_probs

Z_MAX = 4.5
EXAMPLES = 3
INPUT_DIM = 4
SPACES: list[LatentSpace] = [Categorical(5), BitVector(3)]


def make_scores(space: LatentSpace, seed: int = 1, scale: float = 1.0) -> Tensor:
    """Fixed float64 scores ``[EXAMPLES, N]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(EXAMPLES, space.size, generator=g, dtype=torch.float64) * scale


def make_inputs(seed: int = 2) -> Tensor:
    """Fixed encoder inputs ``[EXAMPLES, 2, 2]`` (flattened width INPUT_DIM) for NVIL."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(EXAMPLES, 2, 2, generator=g, dtype=torch.float64)


def draw_gradients(
    estimator: Estimator[Any],
    scores: Tensor,
    decoder: QuadraticDecoderLoss,
    replicas: int,
    groups: int,
    offset: float = 0.0,
    encoder_input: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-draw score gradients ``[groups*replicas, B0, N]`` and per-group mean decoder gradients ``[groups, P]``.

    Each forward replicates the ``B0`` examples ``replicas`` times; the loss of row ``r`` is the decoder loss of
    example ``r % B0`` plus ``offset``.
    """
    batch, width = scores.shape
    params = list(decoder.parameters())

    def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
        loss: Tensor = decoder(z_rows, example_index % batch)
        return loss + offset

    score_draws, decoder_draws = [], []
    for _ in range(groups):
        leaf = scores.detach().repeat(replicas, 1).requires_grad_(True)
        inputs = None if encoder_input is None else encoder_input.repeat(replicas, *[1] * (encoder_input.dim() - 1))
        result = estimator(leaf, loss_fn, inputs)
        grads = torch.autograd.grad(result.surrogate.sum(), [leaf, *params])
        score_draws.append(grads[0].reshape(replicas, batch, width))
        decoder_draws.append(torch.cat([g.flatten() for g in grads[1:]]) / replicas)
    return torch.cat(score_draws), torch.stack(decoder_draws)


def seeded_gradient_problem(space: LatentSpace, scale: float = 1.0) -> tuple[Tensor, QuadraticDecoderLoss, Tensor]:
    """Seed the global RNG (0) and return ``(scores [B, N], decoder, exact score gradient [B, N])`` of the test
    problem on ``space``, scores scaled by ``scale``."""
    torch.manual_seed(0)
    scores = make_scores(space, scale=scale)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    return scores, decoder, exact_gradient(space, scores, lambda s: gibbs_probs(space, s), decoder)


def assert_unbiased_with_power(
    estimator: Estimator[Any], space: LatentSpace
) -> tuple[Tensor, QuadraticDecoderLoss, Tensor]:
    """Assert that ``estimator``'s score and decoder gradients on the seeded problem of ``space`` are unbiased and
    that the same draws reject a 30%-shrunk score gradient (power); returns ``(scores, decoder, exact)``."""
    scores, decoder, exact = seeded_gradient_problem(space)
    score_draws, decoder_draws = draw_gradients(estimator, scores, decoder, replicas=2000, groups=10)
    assert exact.abs().max() > 0.05  # a non-trivial target
    assert max_z_score(score_draws, exact) < Z_MAX
    assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX
    assert max_z_score(score_draws, 0.7 * exact) > Z_MAX
    return scores, decoder, exact


def exact_decoder_gradient(space: LatentSpace, scores: Tensor, decoder: QuadraticDecoderLoss) -> Tensor:
    """Exact ``d/dparams sum_b E_pi[loss_b]``, flattened ``[P]``."""
    value = exact_expectation(space, gibbs_probs(space, scores), decoder).sum()
    grads = torch.autograd.grad(value, list(decoder.parameters()))
    return torch.cat([g.flatten() for g in grads])


def max_z_score(draws: Tensor, exact: Tensor) -> float:
    """Largest ``|mean(draws) - exact| / standard error`` over entries; draws are ``[M, ...]``."""
    draws, exact = draws.detach(), exact.detach()
    error = (draws.mean(0) - exact).abs()
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    exact_match = (standard_error == 0) & (error < 1e-12)
    z = torch.where(exact_match, torch.zeros_like(error), error / standard_error)
    return float(z.max())


def total_variance(draws: Tensor) -> float:
    """Sum over entries of the per-draw variance of gradients ``[M, ...]``."""
    return float(draws.var(0).sum())


class ScaledScoreSFE(SamplingEstimator[SFEConfig]):
    """A deliberately biased SFE: the score-function term is multiplied by ``factor`` (0 drops it)."""

    config_class = SFEConfig

    def __init__(self, space: LatentSpace, factor: float) -> None:
        super().__init__(space)
        self.factor = factor

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        dist = self.distribution(scores)
        z = dist.sample(self.generator)
        index = torch.arange(scores.shape[0])
        losses = evaluate_rows(loss_fn, z, index)
        surrogate = losses + self.factor * losses.detach() * dist.log_prob(z)
        ones = torch.ones_like(index)
        return EstimatorResult(surrogate, losses.detach(), dist.entropy(), ones)


def fixed_baseline_sfe(space: LatentSpace, value: float, **config: Any) -> ScoreFunction:
    """An SFE (or another sampler given by ``config``) in eval mode whose moving-average baseline is frozen at
    ``value``."""
    estimator = ScoreFunction(space, ScoreFunctionConfig(**config)).double().eval()
    assert isinstance(estimator.baseline, MovingAverageBaseline)
    estimator.baseline.value.fill_(value)
    estimator.baseline.updates.fill_(1)
    return estimator


def fixed_nvil(space: LatentSpace) -> NVIL:
    """An NVIL with a small, fixed (randomly initialised) baseline network, float64."""
    torch.manual_seed(5)
    return NVIL(space, NVILConfig(hidden_sizes=(8,))).double()


UNBIASED: dict[str, Callable[[LatentSpace], Estimator[Any]]] = {
    "sfe": lambda space: fixed_baseline_sfe(space, 1.3),
    "sfe+": lambda space: SelfCriticSFE(space),
    "nvil": fixed_nvil,
    "sumsample": lambda space: SumAndSample(space),
    # the family's other combinations: a baseline under the restricted sampler needs its correction term
    "sumsample+moving_average": lambda space: fixed_baseline_sfe(space, 1.3, sampler="sum_and_sample"),
    "sumsample+self_critic": lambda space: ScoreFunction(
        space, ScoreFunctionConfig(sampler="sum_and_sample", baseline="self_critic")
    ),
    "plain-3+self_critic": lambda space: ScoreFunction(space, ScoreFunctionConfig(samples=3, baseline="self_critic")),
    "rloo": lambda space: RLOO(space),
    "rloo-2": lambda space: RLOO(space, RLOOConfig(samples=2)),
    "sumsample-3+leave_one_out": lambda space: ScoreFunction(
        space, ScoreFunctionConfig(sampler="sum_and_sample", samples=3, baseline="leave_one_out")
    ),
}


@pytest.mark.parametrize("space", SPACES, ids=str)
@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_gradients_are_unbiased(name: str, space: LatentSpace) -> None:
    scores, decoder, exact = seeded_gradient_problem(space)
    inputs = make_inputs()
    score_draws, decoder_draws = draw_gradients(
        UNBIASED[name](space), scores, decoder, replicas=2000, groups=10, encoder_input=inputs
    )
    assert exact.abs().max() > 0.05  # a non-trivial target
    assert max_z_score(score_draws, exact) < Z_MAX
    assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX


def test_sum_and_sample_top2_is_unbiased() -> None:
    space = Categorical(6)
    scores, decoder, exact = seeded_gradient_problem(space)
    estimator = SumAndSample(space, SumAndSampleConfig(top_k=2))
    score_draws, decoder_draws = draw_gradients(estimator, scores, decoder, replicas=2000, groups=10)
    assert max_z_score(score_draws, exact) < Z_MAX
    assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_unbiasedness_check_rejects_biased_variants(space: LatentSpace) -> None:
    """The same check, same draw count, flags a dropped and a 30%-shrunk score-function term."""
    scores, decoder, exact = seeded_gradient_problem(space)
    for factor in (0.0, 0.7):
        score_draws, decoder_draws = draw_gradients(ScaledScoreSFE(space, factor), scores, decoder, 2000, 16)
        assert max_z_score(score_draws, exact) > Z_MAX
        # the decoder gradient of this variant is still unbiased: the check does not over-reject
        assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX


@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_objective_is_an_unbiased_estimate_of_the_expected_loss(name: str) -> None:
    assert_objective_unbiased(UNBIASED[name](BitVector(3)))


def assert_objective_unbiased(estimator: Estimator[Any]) -> None:
    """Assert that ``estimator.objective`` (on ``BitVector(3)``) is an unbiased estimate of ``E_pi[loss]``."""
    space = BitVector(3)
    torch.manual_seed(0)
    scores = make_scores(space)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    replicas = 10000
    inputs = make_inputs().repeat(replicas, 1, 1)
    result = estimator(scores.repeat(replicas, 1), lambda z, i: decoder(z, i % EXAMPLES), inputs)
    objective = result.objective.reshape(replicas, EXAMPLES)
    exact = exact_expectation(space, gibbs_probs(space, scores), decoder)
    assert max_z_score(objective, exact) < Z_MAX


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_variance_reduction_against_plain_sfe(space: LatentSpace) -> None:
    """Measured total score-gradient variance ratios (plain SFE with zero baseline / method), loss offset +3:
    Categorical(5): SFE(b = mean E[loss]) 13.2, SFE+ 6.6, Sum&Sample 3.8;
    BitVector(3): SFE(b = mean E[loss]) 10.8, SFE+ 13.8, Sum&Sample 2.1. Asserted with a margin."""
    torch.manual_seed(0)
    scores = make_scores(space, scale=2.0)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    mean_loss = float(exact_expectation(space, gibbs_probs(space, scores), decoder).detach().mean()) + 3.0

    def variance(estimator: Estimator[Any]) -> float:
        draws, _ = draw_gradients(estimator, scores, decoder, replicas=6000, groups=1, offset=3.0)
        return total_variance(draws)

    plain = variance(fixed_baseline_sfe(space, 0.0))
    ratios = {
        "baseline": plain / variance(fixed_baseline_sfe(space, mean_loss)),
        "sfe+": plain / variance(SelfCriticSFE(space)),
        "sumsample": plain / variance(SumAndSample(space)),
    }
    assert ratios["baseline"] > 5, ratios
    assert ratios["sfe+"] > 3, ratios
    assert ratios["sumsample"] > 1.5, ratios


def test_trained_nvil_baseline_beats_a_constant_baseline() -> None:
    """Examples with very different expected losses: a learned b(x) beats the mean expected loss as a constant."""
    space = Categorical(4)
    torch.manual_seed(0)
    scores = make_scores(space)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    offsets = torch.tensor([0.0, 8.0, -8.0], dtype=torch.float64)
    inputs = torch.eye(EXAMPLES, INPUT_DIM, dtype=torch.float64)

    def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
        loss: Tensor = decoder(z_rows, example_index % EXAMPLES)
        return loss + offsets[example_index % EXAMPLES]

    nvil = NVIL(space, NVILConfig(hidden_sizes=(16,))).double()
    optimizer = torch.optim.Adam(nvil.parameters(), lr=0.1)
    for _ in range(60):
        optimizer.zero_grad()
        surrogate = nvil(scores.repeat(64, 1), loss_fn, inputs.repeat(64, 1)).surrogate
        surrogate.mean().backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def variance(estimator: Estimator[Any], encoder_input: Tensor | None) -> float:
        leaf = scores.repeat(4000, 1).requires_grad_(True)
        inp = None if encoder_input is None else encoder_input.repeat(4000, 1)
        (grad,) = torch.autograd.grad(estimator(leaf, loss_fn, inp).surrogate.sum(), leaf)
        return total_variance(grad.reshape(4000, EXAMPLES, -1))

    constant = float(exact_expectation(space, gibbs_probs(space, scores), loss_fn).detach().mean())
    ratio = variance(fixed_baseline_sfe(space, constant), None) / variance(nvil, inputs)
    assert ratio > 4, ratio  # measured 9.7


def test_sfe_moving_average_baseline_updates_in_training_only() -> None:
    space = Categorical(4)
    scores = make_scores(space)
    estimator = SFE(space, SFEConfig(baseline_decay=0.5)).double()
    constant_losses = [2.0, 4.0]
    logged = []
    for value in constant_losses:
        result = estimator(scores, lambda z, i, value=value: z.sum(-1) * value)
        logged.append(float(result.logs["baseline"]))
    # first batch initialises, the second mixes with decay 0.5; the logged value is the pre-update baseline
    assert logged == [0.0, 2.0]
    assert isinstance(estimator.baseline, MovingAverageBaseline)
    assert float(estimator.baseline.value) == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)
    estimator.eval()
    estimator(scores, lambda z, i: z.sum(-1) * 100.0)
    assert float(estimator.baseline.value) == pytest.approx(3.0)
    assert int(estimator.baseline.updates) == 2


def sample_surrogates(estimator: Estimator[Any], scores: Tensor, inputs: Tensor | None) -> Tensor:
    """Surrogate values of one seeded forward."""
    torch.manual_seed(11)
    decoder = QuadraticDecoderLoss(Categorical(scores.shape[1]), scores.shape[0])
    return estimator(scores, decoder, inputs).surrogate.detach()


def test_state_dict_round_trip_restores_behaviour() -> None:
    space = Categorical(4)
    scores = make_scores(space)
    inputs = make_inputs()
    trained_sfe = SFE(space).double()
    torch.manual_seed(0)
    trained_nvil = NVIL(space, NVILConfig(hidden_sizes=(8,))).double()
    optimizer = torch.optim.SGD(trained_nvil.parameters(), lr=0.1)
    for _ in range(3):
        sample_surrogates(trained_sfe, scores, None)
        optimizer.zero_grad()
        decoder = QuadraticDecoderLoss(space, EXAMPLES)
        trained_nvil(scores, decoder, inputs).surrogate.mean().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    torch.manual_seed(1)
    fresh_sfe = SFE(space).double()
    fresh_nvil = NVIL(space, NVILConfig(hidden_sizes=(8,))).double()
    pairs = ((trained_sfe.eval(), fresh_sfe.eval()), (trained_nvil.eval(), fresh_nvil.eval()))
    for trained, fresh in pairs:
        assert not torch.equal(sample_surrogates(fresh, scores, inputs), sample_surrogates(trained, scores, inputs))
        fresh.load_state_dict(trained.state_dict())
        assert torch.equal(sample_surrogates(fresh, scores, inputs), sample_surrogates(trained, scores, inputs))
    assert set(trained_sfe.state_dict()) == {"baseline.value", "baseline.updates"}
    assert isinstance(fresh_sfe.baseline, MovingAverageBaseline)
    assert float(fresh_sfe.baseline.value) != 0.0 and int(fresh_sfe.baseline.updates) == 3


ROWS_PER_EXAMPLE: dict[str, tuple[Callable[[LatentSpace], Estimator[Any]], int]] = {
    "sfe": (lambda space: SFE(space), 1),
    "sfe+": (lambda space: SelfCriticSFE(space), 2),
    "nvil": (lambda space: NVIL(space), 1),
    "sfe-4-samples+self_critic": (
        lambda space: ScoreFunction(space, ScoreFunctionConfig(samples=4, baseline="self_critic")),
        5,
    ),
    "sumsample-2-samples+self_critic": (
        lambda space: SumAndSample(space, SumAndSampleConfig(samples=2, baseline="self_critic")),
        4,
    ),
    "sumsample": (lambda space: SumAndSample(space), 2),
    "rloo": (lambda space: RLOO(space), 4),
    "rloo-2-samples": (lambda space: RLOO(space, RLOOConfig(samples=2)), 2),
    "sumsample-2-samples+leave_one_out": (
        lambda space: SumAndSample(space, SumAndSampleConfig(samples=2, baseline="leave_one_out")),
        3,
    ),
    "sumsample-top3": (lambda space: SumAndSample(space, SumAndSampleConfig(top_k=3)), 4),
    "gumbel": (lambda space: GumbelSoftmax(space), 1),
    "stgumbel": (lambda space: StraightThroughGumbel(space), 1),
}


@pytest.mark.parametrize("space", SPACES, ids=str)
@pytest.mark.parametrize("name", sorted(ROWS_PER_EXAMPLE))
def test_one_loss_call_and_row_counts(name: str, space: LatentSpace) -> None:
    factory, rows = ROWS_PER_EXAMPLE[name]
    if name == "sumsample-top3" and isinstance(space, BitVector):
        with pytest.raises(ValueError, match="top_k=3"):
            factory(space)
        return
    estimator = factory(space).double()
    scores = make_scores(space).requires_grad_(True)
    decoder = QuadraticDecoderLoss(space, EXAMPLES)
    result = estimator(scores, decoder, make_inputs())
    assert decoder.calls == 1 and decoder.rows == rows * EXAMPLES
    assert torch.equal(result.support, torch.full((EXAMPLES,), rows))
    assert result.surrogate.shape == result.objective.shape == result.entropy.shape == (EXAMPLES,)
    assert not result.objective.requires_grad
    (grad,) = torch.autograd.grad(result.entropy.sum(), scores)
    exact_entropy = -(gibbs_probs(space, scores) * gibbs_probs(space, scores).log()).sum(-1)
    (exact_grad,) = torch.autograd.grad(exact_entropy.sum(), scores)
    torch.testing.assert_close(result.entropy, exact_entropy)
    torch.testing.assert_close(grad, exact_grad)
    assert all(value.dim() == 0 for value in result.logs.values())


def test_sum_and_sample_never_resamples_the_summed_assignments() -> None:
    torch.manual_seed(0)
    for space, top_k in ((Categorical(5), 2), (BitVector(3), 1)):
        scores = make_scores(space).repeat(3000, 1)
        decoder = QuadraticDecoderLoss(space, scores.shape[0])
        seen: list[Tensor] = []

        def record(
            z_rows: Tensor, example_index: Tensor, decoder: QuadraticDecoderLoss = decoder, seen: list[Tensor] = seen
        ) -> Tensor:
            seen.append(z_rows)
            loss: Tensor = decoder(z_rows, example_index)
            return loss

        SumAndSample(space, SumAndSampleConfig(top_k=top_k))(scores, record)
        rows = seen[0].reshape(scores.shape[0], top_k + 1, -1)
        summed, drawn = rows[:, :top_k], rows[:, top_k:]
        assert not (summed == drawn).all(-1).any()
        # the drawn row follows pi restricted to the complement: compare frequencies of example 0
        table = space.enumerate().to(scores)
        probs = gibbs_probs(space, scores[:1])[0]
        in_top = (table.unsqueeze(0) == summed[0].unsqueeze(1)).all(-1).any(0)
        target = torch.where(in_top, torch.zeros_like(probs), probs)
        target = target / target.sum()
        hits = (drawn[0::EXAMPLES, 0].unsqueeze(1) == table.unsqueeze(0)).all(-1).to(scores.dtype)
        assert max_z_score(hits, target) < Z_MAX


def test_refusals_and_config_errors() -> None:
    budgeted = BitVector(4, budget=2)
    for cls in (SFE, SelfCriticSFE, SumAndSample, RLOO, GumbelSoftmax, StraightThroughGumbel):
        with pytest.raises(IncompatibleSpaceError, match="budget=2"):
            cls(budgeted)
    with pytest.raises(IncompatibleSpaceError, match="budget=2"):
        NVIL(budgeted)
    nvil = NVIL(Categorical(3), NVILConfig(hidden_sizes=(4,))).double()
    decoder = QuadraticDecoderLoss(Categorical(3), EXAMPLES)
    scores = make_scores(Categorical(3))
    with pytest.raises(ValueError, match="encoder_input"):
        nvil(scores, decoder)
    nvil(scores, decoder, torch.zeros(EXAMPLES, 2, 2, dtype=torch.float64))  # sizes the baseline: width 4
    with pytest.raises(ValueError, match=r"sized for encoder inputs of width 4, .* width 5"):
        nvil(scores, decoder, torch.zeros(EXAMPLES, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="'baseline' must be in"):
        ScoreFunctionConfig(baseline="learnt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'sampler' must be in"):
        ScoreFunctionConfig(sampler="sum-and-sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"baseline_decay must be a number in \[0, 1\), got 1.0"):
        SFEConfig(baseline_decay=1.0)
    with pytest.raises(ValueError, match=r"baseline_decay .* got -0.1"):
        SFEConfig(baseline_decay=-0.1)
    with pytest.raises(ValueError, match=r"hidden_sizes .*bad entry 0"):
        NVILConfig(hidden_sizes=(8, 0))
    with pytest.raises(ValueError, match="top_k must be an int >= 1, got 0"):
        SumAndSampleConfig(top_k=0)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, K-1=3\] .* got top_k=4"):
        SumAndSample(Categorical(4), SumAndSampleConfig(top_k=4))
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        SFE(Categorical(3))(torch.zeros(2, 4), decoder)
