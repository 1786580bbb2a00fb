"""Gumbel-Rao (Paulus, Maddison & Krause, "Rao-Blackwellizing the Straight-Through Gumbel-Softmax Gradient
Estimator", ICLR 2021; ``gumbel-rao``): straight-through Gumbel whose relaxed gradient is averaged over ``m``
relaxation noises drawn **conditionally on the hard sample**. One decoder row per example.

Straight-through Gumbel (``stgumbel``) evaluates the loss on the hard sample ``D = H(scores + G)`` (``H`` the
argmax for ``Categorical(K)``, the threshold at 0 for ``BitVector(D)`` without budget) and backpropagates through
the relaxed sample ``softmax((scores + G) / tau)`` (``sigmoid`` for bits). Its gradient is a function of
``(D, G)``; Gumbel-Rao replaces it by its conditional expectation given ``D``, estimated with ``m`` draws
``G_1..G_m ~ p(G | H(scores + G) = D)`` (:meth:`EncoderDistribution.conditional_noise`: exact truncated-Gumbel /
truncated-logistic sampling, no rejection). So its mean gradient is **exactly** stgumbel's (same bias) and its
variance is lower (Rao-Blackwell); the loss sees ``D``, an exact sample of pi, so the objective and the decoder
gradient are unbiased. The ``m`` relaxed samples enter the gradient path only: the loss is called once, on
``D + (mean_j y_j - mean_j y_j.detach())``.
"""

from __future__ import annotations

import attrs
from torch import Tensor

from lvzoo.estimators.distributions import EncoderDistribution
from lvzoo.estimators.gumbel import GumbelConfig, GumbelSoftmax
from lvzoo.estimators.validators import positive_int


@attrs.frozen
class GumbelRaoConfig(GumbelConfig):
    """``samples`` (m >= 1): conditional noise draws averaged per example (the paper uses up to 1000; m=1 is
    stgumbel in distribution); the temperature schedule is :class:`GumbelConfig`'s."""

    samples: int = attrs.field(default=10, validator=positive_int)


class GumbelRao(GumbelSoftmax):
    """Gumbel-Rao (``gumbel-rao``), ``Categorical(K)`` and ``BitVector(D)`` without budget: 1 decoder row per example
    and ``m`` relaxed samples (no decoder cost) per example; biased like ``stgumbel``, with lower variance.

    ``surrogate = loss(D + ybar - ybar.detach())`` with ``ybar = mean_j relax(G_j)``; ``objective = loss(D)`` (an
    unbiased estimate of ``E_pi[loss]``); ``entropy``: the analytic entropy of pi; ``support = 1``; logs
    ``temperature``. The temperature schedule and its ``step`` buffer are ``gumbel``'s.
    """

    config_class = GumbelRaoConfig
    config: GumbelRaoConfig

    def rows(self, dist: EncoderDistribution, temperature: Tensor) -> Tensor:
        """The hard sample carrying the gradient of the mean of ``samples`` relaxations conditioned on it."""
        hard = dist.sample(self.generator)
        noise = dist.conditional_noise(hard, self.config.samples, self.generator)
        mean_relaxed = dist.relax(noise, temperature).mean(1)
        row: Tensor = hard + (mean_relaxed - mean_relaxed.detach())
        return row
