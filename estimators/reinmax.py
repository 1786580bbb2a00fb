"""ReinMax (Liu et al., "Bridging Discrete and Backpropagation: Straight-Through and Beyond",
NeurIPS 2023; ``reinmax``): the second-order straight-through estimator. One decoder row per example.

Straight-through is a forward-Euler approximation of ``f(D_i) - f(D_j)`` by one gradient of ``f``; ReinMax uses
Heun's method (the trapezoidal rule, exact when ``f`` is quadratic) instead. With ``pi0 = softmax(scores)``, ``D`` an
exact one-hot sample of pi0 and ``g = df/dz`` at ``z = D``, its estimate of ``d E_pi0[f] / d scores`` is

    2 J(pi1) g - 1/2 J(pi0) g,    pi1 = (D + softmax(scores / tau)) / 2,    J(p) = diag(p) - p p^T,

the paper's Algorithm 2 (``pi1 <- softmax(sg(log pi1 - theta) + theta)``, ``pi2 = 2 pi1 - pi0 / 2``, rows
``pi2 - sg(pi2) + D``): ``J(p)`` is the Jacobian of that re-centred softmax w.r.t. the scores. Here it is written as
the zero-valued linear term ``J(p) (scores - sg(scores))`` (``J`` symmetric), so the loss sees exactly ``D``.

Bit vectors (independent Bernoulli(sigmoid(t_i)), no budget) are handled per bit as two-class categoricals with
logits ``(t_i, 0)``: ``J(p)`` becomes ``p (1 - p)`` with ``pi0 = sigmoid(t)`` and ``pi1 = (b + sigmoid(t / tau)) / 2``.
At ``tau = 1`` the estimate is unbiased whenever ``f`` is quadratic in ``z`` (the tests check it); otherwise it is
biased. The objective and the decoder gradient come from ``f(D)``, an exact sample, so both are unbiased.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, EstimatorResult, LossFn, evaluate_rows
from lvzoo.estimators.distributions import CategoricalDistribution, SamplingEstimator
from lvzoo.estimators.validators import positive_number


@attrs.frozen
class ReinMaxConfig(EstimatorConfig):
    """``temperature`` (the paper's tau > 0, default 1.0): only ``pi1`` uses it; the sample is always from pi."""

    temperature: float = attrs.field(default=1.0, validator=positive_number)


def softmax_jacobian_product(probs: Tensor, vector: Tensor) -> Tensor:
    """``(diag(p) - p p^T) v`` for probabilities ``probs [..., K]`` and ``vector [..., K]``."""
    return probs * (vector - (probs * vector).sum(-1, keepdim=True))


class ReinMax(SamplingEstimator[ReinMaxConfig]):
    """ReinMax (``reinmax``) for ``Categorical(K)`` and ``BitVector(D)`` without budget: 1 row per example; biased
    score gradient (module docstring), unbiased objective and decoder gradient.

    ``surrogate = loss(D + 2 J(pi1) delta - J(pi0) delta / 2)`` with ``delta = scores - scores.detach()`` (zero in
    value); ``objective = loss(D)``; ``entropy``: the analytic entropy of pi; ``support = 1``; logs ``temperature``.
    """

    config_class: ClassVar[type[EstimatorConfig]] = ReinMaxConfig

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]`` -> ``[B]`` results; one loss call on ``[B, N]`` hard rows carrying ReinMax's gradient."""
        dist = self.distribution(scores)
        batch = scores.shape[0]
        tau = self.config.temperature
        hard = dist.sample(self.generator)
        logits = scores.detach()
        delta = scores - logits
        if isinstance(dist, CategoricalDistribution):
            pi0 = torch.softmax(logits, dim=-1)
            pi1 = 0.5 * (hard + torch.softmax(logits / tau, dim=-1))
            direction = 2.0 * softmax_jacobian_product(pi1, delta) - 0.5 * softmax_jacobian_product(pi0, delta)
        else:
            p0 = torch.sigmoid(logits)
            p1 = 0.5 * (hard + torch.sigmoid(logits / tau))
            direction = (2.0 * p1 * (1.0 - p1) - 0.5 * p0 * (1.0 - p0)) * delta
        z_rows = hard + direction
        index = torch.arange(batch, device=scores.device)
        losses = evaluate_rows(loss_fn, z_rows, index)
        return EstimatorResult(
            surrogate=losses,
            objective=losses.detach(),
            entropy=dist.entropy(),
            support=torch.ones(batch, dtype=torch.long, device=scores.device),
            logs={"temperature": torch.full((), tau, dtype=scores.dtype, device=scores.device)},
        )
