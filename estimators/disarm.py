"""DisARM (Dong, Mnih & Tucker, "DisARM: An Antithetic Gradient Estimator for Binary Latent Variables", NeurIPS
2020): an unbiased, antithetic score-function estimator for independent Bernoulli bits, 2 decoder rows per example.

Per example, one logistic noise vector ``eps`` (``[D]``) gives two exact samples of ``pi = prod_i
Bernoulli(sigmoid(t_i))``: ``b = 1[t + eps > 0]`` and its antithetic ``b~ = 1[t - eps > 0]`` (the same uniform
``u`` read as ``1 - u`` and ``u``). The estimate of ``d E_pi[f] / d t_i`` is

    g_i = 1/2 (f(b) - f(b~)) * (-1)^(b~_i) * 1[b_i != b~_i] * sigmoid(|t_i|),

the ARM estimator with the per-dimension noise integrated out conditionally on ``(b, b~)``. It is unbiased (for
one bit: ``P(b = 1, b~ = 0) = P(b = 0, b~ = 1) = min(p, 1 - p)`` and ``min(p, 1 - p) sigmoid(|t|) = p (1 - p)``)
and symmetric in ``(b, b~)``. The decoder gradient comes from ``(f(b) + f(b~)) / 2``, unbiased since both rows
are exact samples. Budgeted bit vectors (non-factorial) and categorical spaces are refused.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, EstimatorResult, LossFn, evaluate_rows
from lvzoo.estimators.distributions import BernoulliDistribution, SamplingEstimator
from lvzoo.estimators.spaces import BitVector, Categorical


@attrs.frozen
class DisARMConfig(EstimatorConfig):
    """DisARM has no hyper-parameters: one antithetic pair (2 rows) per example."""


class DisARM(SamplingEstimator[DisARMConfig]):
    """DisARM for ``BitVector(D)`` without budget (``disarm``): 2 rows per example, unbiased (module docstring).

    ``surrogate = (f(b) + f(b~)) / 2 + sum_i g_i.detach() * (t_i - t_i.detach())`` (the second term is zero in
    value); ``objective = (f(b) + f(b~)) / 2``, an unbiased estimate of ``E_pi[f]``; ``entropy``: the analytic
    Bernoulli entropy; ``support = 2``; logs ``disarm_differing_bits``, the mean fraction of bits where ``b != b~``.
    """

    config_class: ClassVar[type[EstimatorConfig]] = DisARMConfig
    supported_spaces: ClassVar[tuple[type[Categorical | BitVector], ...]] = (BitVector,)

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, D]`` -> ``[B]`` results; one loss call on ``[B * 2, D]`` rows ``(b, b~)`` per example."""
        dist = self.distribution(scores)
        assert isinstance(dist, BernoulliDistribution)
        batch, width = scores.shape
        b, b_tilde = dist.antithetic_pair(self.generator)
        rows = torch.stack([b, b_tilde], dim=1).reshape(batch * 2, width)
        index = torch.arange(batch, device=scores.device).repeat_interleave(2)
        losses = evaluate_rows(loss_fn, rows, index).reshape(batch, 2)
        differ = (b != b_tilde).to(scores.dtype)
        sign = 1.0 - 2.0 * b_tilde  # (-1)^(b~_i)
        half_difference = 0.5 * (losses[:, 0] - losses[:, 1]).detach().unsqueeze(-1)
        per_bit = half_difference * sign * differ * torch.sigmoid(scores.detach().abs())
        surrogate = losses.mean(-1) + (per_bit * (scores - scores.detach())).sum(-1)
        return EstimatorResult(
            surrogate=surrogate,
            objective=losses.detach().mean(-1),
            entropy=dist.entropy(),
            support=torch.full((batch,), 2, dtype=torch.long, device=scores.device),
            logs={"disarm_differing_bits": differ.mean()},
        )
