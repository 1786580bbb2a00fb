"""IndeCateR (De Smet, Sansone & Zuidberg Dos Martires, "Differentiable Sampling of Categorical Distributions Using
the CatLog-Derivative Trick", NeurIPS 2023; ``indecater``): the Rao-Blackwellized, per-dimension unbiased estimator
for products of independent categoricals.

For ``pi(z) = prod_i pi_i(z_i)`` the CatLog-derivative trick gives, for the parameters of dimension ``i``,

    d E_pi[f] / d t_i = E_{z ~ pi} [ sum_v (d pi_i(v) / d t_i) f(z with z_i = v) ],

the expectation over ``z_i`` done exactly, the other dimensions sampled. lvzoo's spaces:

- ``BitVector(D)`` without budget (``pi_i = Bernoulli(sigmoid(t_i))``): for a shared sample ``z``, the two values of
  bit ``i`` are ``z`` itself and ``z`` with bit ``i`` flipped, so one sample costs **D + 1 decoder rows** (the
  sample and its ``D`` one-bit flips), not ``2 D``; with ``q_i = pi_i(z_i)`` the estimate is
  ``g_i = (dq_i / dt_i) (f(z) - f(flip_i z))``. ``samples`` shared samples cost ``samples * (D + 1)`` rows and are
  averaged.
- ``Categorical(K)`` is the one-dimensional case: nothing is left to sample, the sum over the ``K`` values is the
  exact expectation (K rows, the gradient and objective are exact; ``samples`` has no effect).

The decoder gradient and the objective come from ``mean_i sum_v pi_i(v) f(z with z_i = v)`` (detached weights), an
unbiased estimate of ``E_pi[f]`` for every ``i``. Budgeted bit vectors (non-factorial) are refused.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, EstimatorResult, LossFn, evaluate_rows
from lvzoo.estimators.distributions import CategoricalDistribution, EncoderDistribution, SamplingEstimator
from lvzoo.estimators.validators import positive_int


@attrs.frozen
class IndeCateRConfig(EstimatorConfig):
    """``samples`` (>= 1): shared samples per example for bit vectors, each costing ``D + 1`` decoder rows
    (ignored for ``Categorical``, which is summed exactly)."""

    samples: int = attrs.field(default=1, validator=positive_int)


class IndeCateR(SamplingEstimator[IndeCateRConfig]):
    """IndeCateR (``indecater``): unbiased; ``samples * (D + 1)`` decoder rows per example for ``BitVector(D)``
    (no budget), ``K`` for ``Categorical(K)`` (exact). See the module docstring.

    Bits, per shared sample ``z`` with ``q_i = pi_i(z_i)`` (``S`` samples averaged)::

        surrogate = mean_i [sg(q_i) f(z) + sg(1 - q_i) f(flip_i z)] + sum_i (q_i - sg(q_i)) sg(f(z) - f(flip_i z))

    (the second term is zero in value); ``objective``: the first term, detached; ``support = S (D + 1)``. Categorical:
    ``surrogate = sum_k pi_k f(e_k)``, the exact expectation; ``support = K``. ``entropy``: the analytic entropy.
    """

    config_class: ClassVar[type[EstimatorConfig]] = IndeCateRConfig

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]`` -> ``[B]`` results; one loss call on the rows grouped by example."""
        dist = self.distribution(scores)
        if isinstance(dist, CategoricalDistribution):
            return self._categorical(dist, loss_fn)
        return self._bits(dist, loss_fn)

    def shared_samples(self, dist: EncoderDistribution) -> Tensor:
        """The ``samples`` shared exact samples of pi per example, ``[B, S, D]`` (no gradient)."""
        return torch.stack([dist.sample(self.generator) for _ in range(self.config.samples)], dim=1)

    def _bits(self, dist: EncoderDistribution, loss_fn: LossFn) -> EstimatorResult:
        scores = dist.scores
        batch, width = scores.shape
        z = self.shared_samples(dist)
        samples = z.shape[1]
        flips = torch.eye(width, dtype=z.dtype, device=z.device)
        flipped = (z.unsqueeze(2) - flips).abs()  # [B, S, D, D]: row i has bit i flipped
        rows = torch.cat([z.unsqueeze(2), flipped], dim=2)  # [B, S, D + 1, D]
        per_example = samples * (width + 1)
        index = torch.arange(batch, device=scores.device).repeat_interleave(per_example)
        losses = evaluate_rows(loss_fn, rows.reshape(-1, width), index).reshape(batch, samples, width + 1)
        sampled, flip_losses = losses[..., :1], losses[..., 1:]  # [B, S, 1], [B, S, D]
        p = torch.sigmoid(scores).unsqueeze(1)
        q = z * p + (1 - z) * (1 - p)  # probability of the sampled value of each bit, differentiable
        q_detached = q.detach()
        rao_blackwellized = (q_detached * sampled + (1 - q_detached) * flip_losses).mean(-1)  # [B, S]
        score_term = ((q - q_detached) * (sampled - flip_losses).detach()).sum(-1)
        surrogate = (rao_blackwellized + score_term).mean(-1)
        return EstimatorResult(
            surrogate=surrogate,
            objective=rao_blackwellized.detach().mean(-1),
            entropy=dist.entropy(),
            support=torch.full((batch,), per_example, dtype=torch.long, device=scores.device),
        )

    def _categorical(self, dist: CategoricalDistribution, loss_fn: LossFn) -> EstimatorResult:
        scores = dist.scores
        batch, classes = scores.shape
        categories = torch.arange(classes, device=scores.device).repeat(batch)
        rows = torch.eye(classes, dtype=scores.dtype, device=scores.device)[categories]
        index = torch.arange(batch, device=scores.device).repeat_interleave(classes)
        losses = evaluate_rows(loss_fn, rows, index, categories).reshape(batch, classes)
        expected = (dist.log_probs.exp() * losses).sum(-1)
        return EstimatorResult(
            surrogate=expected,
            objective=expected.detach(),
            entropy=dist.entropy(),
            support=torch.full((batch,), classes, dtype=torch.long, device=scores.device),
        )
