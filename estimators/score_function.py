"""The score-function (REINFORCE) family: one estimator, :class:`ScoreFunction`, combining by configuration

- a **sampler** (``sampler``): ``plain`` draws ``samples`` rows from pi; ``sum_and_sample`` sums the ``top_k`` most
  probable assignments exactly and draws ``samples`` rows from pi restricted to the rest (Liu et al. 2019);
- a **baseline** (``baseline``, :mod:`lvzoo.estimators.baselines`): ``none``, ``moving_average``, ``self_critic``,
  ``learned`` (NVIL's ``b(x)``) or ``leave_one_out`` (RLOO: the mean loss of the other ``S - 1`` samples);
- the **gradient rule**, the score-function identity ``grad E[f] = E[f grad log pi + grad f]`` with the baseline
  subtracted from ``f`` in the score term, optionally divided by a running standard deviation (``normalize_signal``,
  NVIL's variance normalisation: the score gradient is then unbiased up to a positive scale).

The registered names are presets of this one estimator: ``sfe`` (plain + moving average), ``sfe+`` (plain +
self-critic), ``nvil`` (plain + learned), ``rloo`` (plain, 4 samples + leave-one-out) and ``sumsample``
(sum-and-sample, no baseline); any preset takes the other
fields too (``--estimator sfe --set baseline=learned``). Each works for ``Categorical(K)`` and ``BitVector(D)``
without budget and returns a surrogate whose gradient is an unbiased estimate of the gradient of ``E_pi[loss]``
w.r.t. the scores and the decoder parameters. Shapes: ``B`` examples, rows of width ``N = space.size``; per example
``k`` exactly summed rows, ``S`` sampled rows and ``E`` extra rows for the baseline.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, EstimatorResult, LossFn, evaluate_rows
from lvzoo.estimators.baselines import SignalNormalizer, make_baseline
from lvzoo.estimators.distributions import EncoderDistribution, SamplingEstimator
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from lvzoo.estimators.validators import number_in, positive_int, positive_int_tuple

SamplerName = Literal["plain", "sum_and_sample"]
BaselineName = Literal["none", "moving_average", "self_critic", "learned", "leave_one_out"]


def _to_int_tuple(value: object) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ValueError(f"hidden_sizes must be a tuple of ints >= 1, got {value!r}")


_SAMPLERS = attrs.validators.in_(("plain", "sum_and_sample"))
_BASELINES = attrs.validators.in_(("none", "moving_average", "self_critic", "learned", "leave_one_out"))


@attrs.frozen
class ScoreFunctionConfig(EstimatorConfig):
    """``sampler``: ``plain`` | ``sum_and_sample``; ``samples``: sampled rows per example (S >= 1); ``top_k``:
    rows summed exactly by ``sum_and_sample`` (the paper's code: 1; bit vectors support 1 only); ``baseline``:
    ``none`` | ``moving_average`` | ``self_critic`` | ``learned`` | ``leave_one_out`` (needs ``samples >= 2``);
    ``baseline_decay`` in [0, 1): weight of the old value in the moving average; ``hidden_sizes``: ReLU layers of
    the learned baseline (the paper's: 512, 512, 512); ``normalize_signal``: divide the centred signal by
    ``max(1, running std)`` (NVIL's variance normalisation; plain sampler only), whose running variance has weight
    ``normalize_decay`` (NVIL's alpha = 0.8) on the old value.
    """

    sampler: SamplerName = attrs.field(default="plain", validator=_SAMPLERS)
    samples: int = attrs.field(default=1, validator=positive_int)
    top_k: int = attrs.field(default=1, validator=positive_int)
    baseline: BaselineName = attrs.field(
        default="moving_average", validator=_BASELINES
    )
    baseline_decay: float = attrs.field(default=0.99, validator=number_in(0, 1, high_open=True))
    hidden_sizes: tuple[int, ...] = attrs.field(
        default=(512, 512, 512), converter=_to_int_tuple, validator=positive_int_tuple
    )
    normalize_signal: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    normalize_decay: float = attrs.field(default=0.8, validator=number_in(0, 1, high_open=True))

    def __attrs_post_init__(self) -> None:
        if self.baseline == "leave_one_out" and self.samples < 2:
            raise ValueError(
                f"baseline=leave_one_out needs samples >= 2 (each sample is centred by the mean loss of the others), "
                f"got samples={self.samples}"
            )
        if self.normalize_signal and self.sampler != "plain":
            raise ValueError(
                "normalize_signal applies to sampler=plain only: with sum_and_sample the exactly summed rows' "
                "gradient would not be rescaled with the sampled ones, so the gradient direction would change"
            )


@attrs.frozen
class Draw:
    """The rows one step evaluates: ``exact_rows [B, k, N]`` with differentiable ``exact_log_probs [B, k]``,
    ``sampled_rows [B, S + E, N]`` (the last ``E`` for the baseline) and ``weight [B]`` (detached): the mass the
    sampled rows stand for, ``1 - pi(exact rows)``."""

    exact_rows: Tensor
    exact_log_probs: Tensor
    sampled_rows: Tensor
    weight: Tensor


def draw_rows(
    dist: EncoderDistribution, config: ScoreFunctionConfig, draws: int, generator: torch.Generator | None
) -> Draw:
    """``draws`` rows per example from ``config.sampler`` (see the module docstring)."""
    scores = dist.scores
    if config.sampler == "plain":
        sampled = torch.stack([dist.sample(generator) for _ in range(draws)], dim=1)
        batch, width = scores.shape
        return Draw(scores.new_zeros(batch, 0, width), scores.new_zeros(batch, 0), sampled, scores.new_ones(batch))
    splits = [dist.top_k_split(config.top_k, generator) for _ in range(draws)]
    return Draw(
        exact_rows=splits[0].top_rows,
        exact_log_probs=splits[0].top_log_probs,
        sampled_rows=torch.stack([split.complement_sample for split in splits], dim=1),
        weight=splits[0].complement_log_mass.exp(),
    )


class ScoreFunction(SamplingEstimator[ScoreFunctionConfig]):
    """Score-function estimator: sampler x baseline (module docstring); ``k + S + E`` rows per example.

    With ``exact`` the summed rows and ``z_s`` the sampled ones (weight ``w = 1 - pi(exact)``)::

        surrogate = sum_exact pi(z) loss(z) + w * mean_s [loss(z_s) + (loss(z_s) - b_s).detach() * log pi(z_s)]
                    - b.detach() * (pi(exact) - pi(exact).detach()) + penalty

    With ``normalize_signal`` the centred signal ``(loss(z_s) - b_s)`` is divided by ``max(1, running std)`` (a
    constant given the past steps), so the score gradient is the unbiased one divided by that positive scale, while
    the pathwise term ``loss(z_s)`` (the decoder gradient) is untouched and stays unbiased; logs ``signal_scale``.
    The third term (zero in value) restores unbiasedness when a baseline meets the restricted sampler:
    ``E[grad log pi(z_s)] = grad(1 - pi(exact)) / w`` there, not 0. The objective is
    ``sum_exact pi loss + w * mean`` of all ``S + E`` sampled losses (each an unbiased estimate). Logs the
    baseline's entries and, with exact rows, ``summed_mass`` (mean of pi(exact)).
    """

    config_class: ClassVar[type[EstimatorConfig]] = ScoreFunctionConfig

    def __init__(
        self,
        space: LatentSpace,
        config: ScoreFunctionConfig | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(space, config, generator=generator)
        config = self.config
        if config.sampler == "sum_and_sample":
            if isinstance(space, Categorical) and config.top_k >= space.K:
                raise ValueError(f"top_k must be in [1, K-1={space.K - 1}] for {space!r}, got top_k={config.top_k}")
            if isinstance(space, BitVector) and config.top_k != 1:
                raise ValueError(f"Sum&Sample on bit vectors supports top_k=1 (the MAP) only, got top_k={config.top_k}")
        self.baseline = make_baseline(
            config.baseline, decay=config.baseline_decay, hidden_sizes=config.hidden_sizes, samples=config.samples
        )
        self.normalizer = SignalNormalizer(config.normalize_decay) if config.normalize_signal else None

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]`` -> ``[B]`` results; loss rows ``[B * (k + S + E), N]`` grouped by example."""
        dist = self.distribution(scores)
        batch, width = scores.shape
        samples = self.config.samples
        draw = draw_rows(dist, self.config, samples + self.baseline.extra_samples, self.generator)
        rows = torch.cat([draw.exact_rows, draw.sampled_rows], dim=1)
        per_example = rows.shape[1]
        flat = rows.reshape(-1, width)
        index = torch.arange(batch, device=scores.device).repeat_interleave(per_example)
        losses = evaluate_rows(loss_fn, flat, index, dist.categories(flat)).reshape(batch, per_example)
        exact = draw.exact_rows.shape[1]
        exact_losses, drawn_losses = losses[:, :exact], losses[:, exact:]
        sampled = drawn_losses[:, :samples]
        baseline = self.baseline(sampled.detach(), drawn_losses[:, samples:].detach(), encoder_input, self.generator)
        b = baseline.value.to(losses.dtype).expand_as(sampled)
        log_probs = torch.stack([dist.log_prob(draw.sampled_rows[:, s]) for s in range(samples)], dim=1)
        signal = (sampled - b).detach()
        scale: Tensor | None = None
        if self.normalizer is not None:
            signal, scale = self.normalizer(signal)
        score_term = (sampled + signal * log_probs).mean(-1)
        exact_probs = draw.exact_log_probs.exp()
        exact_mass = exact_probs.sum(-1)
        surrogate = (exact_probs * exact_losses).sum(-1) + draw.weight * score_term + baseline.penalty
        if exact:
            surrogate = surrogate - b.detach().mean(-1) * (exact_mass - exact_mass.detach())
        objective = (exact_probs * exact_losses).detach().sum(-1) + draw.weight * drawn_losses.detach().mean(-1)
        logs = dict(baseline.logs)
        if scale is not None:
            logs["signal_scale"] = scale
        if exact:
            logs["summed_mass"] = exact_mass.detach().mean()
        return EstimatorResult(
            surrogate=surrogate,
            objective=objective,
            entropy=dist.entropy(),
            support=torch.full((batch,), per_example, dtype=torch.long, device=scores.device),
            logs=logs,
        )


# --- the registered presets: the same estimator with other defaults ----------------------------------------------


@attrs.frozen
class SFEConfig(ScoreFunctionConfig):
    """``sfe``: plain sampling with a moving-average baseline."""


class SFE(ScoreFunction):
    """``sfe``: 1 row per example, ``b`` an exponential moving average of the batch-mean loss."""

    config_class = SFEConfig


@attrs.frozen
class SelfCriticConfig(ScoreFunctionConfig):
    """``sfe+``: plain sampling with the self-critic baseline."""

    baseline: BaselineName = attrs.field(
        default="self_critic", validator=_BASELINES
    )


class SelfCriticSFE(ScoreFunction):
    """``sfe+``: 2 rows per example, ``b = loss(z')`` of a second independent sample."""

    config_class = SelfCriticConfig


@attrs.frozen
class NVILConfig(ScoreFunctionConfig):
    """``nvil``: plain sampling with the learned baseline ``b(x)``."""

    baseline: BaselineName = attrs.field(
        default="learned", validator=_BASELINES
    )


class NVIL(ScoreFunction):
    """``nvil``: 1 row per example, ``b(x)`` an MLP on the encoder input trained by squared error through the same
    backward pass (add the estimator's parameters to the optimizer). NVIL's variance normalisation is off by default
    (Adam is largely invariant to the gradient scale); ``normalize_signal=True`` turns it on."""

    config_class = NVILConfig


@attrs.frozen
class RLOOConfig(ScoreFunctionConfig):
    """``rloo``: plain sampling of 4 rows with the leave-one-out baseline (Kool et al. 2019 use 4 samples)."""

    samples: int = attrs.field(default=4, validator=positive_int)
    baseline: BaselineName = attrs.field(
        default="leave_one_out", validator=_BASELINES
    )


class RLOO(ScoreFunction):
    """RLOO (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free!", ``rloo``): ``S``
    rows per example (default 4, at least 2), each centred by the mean loss of the other ``S - 1``; unbiased."""

    config_class = RLOOConfig


@attrs.frozen
class SumAndSampleConfig(ScoreFunctionConfig):
    """``sumsample``: the sum-and-sample sampler without a baseline."""

    sampler: SamplerName = attrs.field(default="sum_and_sample", validator=_SAMPLERS)
    baseline: BaselineName = attrs.field(
        default="none", validator=_BASELINES
    )


class SumAndSample(ScoreFunction):
    """Sum&Sample (Liu et al. 2019, ``sumsample``): ``top_k + 1`` rows per example, unbiased; with S the ``top_k``
    most probable assignments (for bit vectors the MAP) and z' drawn exactly from pi restricted to the rest."""

    config_class = SumAndSampleConfig
