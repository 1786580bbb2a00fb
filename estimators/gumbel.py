"""Relaxed estimators: Gumbel-Softmax / binary Concrete (``gumbel``) and their straight-through variant
(``stgumbel``), for ``Categorical(K)`` and ``BitVector(D)`` without budget. One row per example.

Temperature schedule (the paper's code): ``tau = max(tau_min, tau0 * exp(-decay_rate * s))`` where ``s`` is the
training step at the last update, ``s = update_every * floor(step / update_every)``; ``step`` is a buffer (saved
in the state dict) counting training-mode forwards. Following the paper, the entropy is that of the discrete
distribution pi, not of the relaxation.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, EstimatorResult, LossFn, evaluate_rows
from lvzoo.estimators.distributions import EncoderDistribution, SamplingEstimator
from lvzoo.estimators.spaces import LatentSpace
from lvzoo.estimators.validators import non_negative_number, positive_int, positive_number


@attrs.frozen
class GumbelConfig(EstimatorConfig):
    """Temperature schedule: start ``tau0``, floor ``tau_min`` (0 < tau_min <= tau0), exponential
    ``decay_rate`` per step (>= 0), recomputed every ``update_every`` training steps."""

    tau0: float = attrs.field(default=1.0, validator=positive_number)
    tau_min: float = attrs.field(default=0.5, validator=positive_number)
    decay_rate: float = attrs.field(default=1e-4, validator=non_negative_number)
    update_every: int = attrs.field(default=1000, validator=positive_int)

    @tau_min.validator
    def _check_floor(self, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(self.tau0, (int, float)) and value > self.tau0:
            raise ValueError(f"tau_min must be <= tau0={self.tau0}, got {value!r}")


class GumbelSoftmax(SamplingEstimator[GumbelConfig]):
    """Gumbel-Softmax / binary Concrete (``gumbel``): the loss sees the relaxed sample ``[B, N]``.

    ``y = softmax((scores + G) / tau)`` (categorical) or ``sigmoid((t + L) / tau)`` (bits, L logistic);
    surrogate = objective (undetached) = loss(y): a Monte-Carlo estimate of the *relaxed* loss, so both the value
    and the gradient are biased w.r.t. ``E_pi[loss]``. Logs ``temperature``.
    """

    config_class = GumbelConfig
    straight_through: ClassVar[bool] = False
    step: Tensor

    def __init__(
        self,
        space: LatentSpace,
        config: GumbelConfig | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(space, config, generator=generator)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def temperature(self) -> Tensor:
        """The current temperature (scalar float32 tensor on the buffers' device)."""
        config = self.config
        last_update = torch.div(self.step, config.update_every, rounding_mode="floor") * config.update_every
        decayed = config.tau0 * torch.exp(-config.decay_rate * last_update.to(torch.float32))
        return decayed.clamp_min(config.tau_min)

    def rows(self, dist: EncoderDistribution, temperature: Tensor) -> Tensor:
        """The row ``[B, N]`` the loss sees: the relaxed sample, or (straight-through) its hard rounding carrying
        the relaxed sample's gradient."""
        relaxed = dist.relaxed_sample(temperature, self.generator)
        if self.straight_through:
            return dist.harden(relaxed) + (relaxed - relaxed.detach())
        return relaxed

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]`` -> ``[B]`` results; one row per example (:meth:`rows`)."""
        dist = self.distribution(scores)
        batch = scores.shape[0]
        temperature = self.temperature()
        z_rows = self.rows(dist, temperature.to(scores.dtype))
        index = torch.arange(batch, device=scores.device)
        losses = evaluate_rows(loss_fn, z_rows, index)
        if self.training:
            self.step += 1
        return EstimatorResult(
            surrogate=losses,
            objective=losses.detach(),
            entropy=dist.entropy(),
            support=torch.ones(batch, dtype=torch.long, device=scores.device),
            logs={"temperature": temperature},
        )


class StraightThroughGumbel(GumbelSoftmax):
    """Straight-through Gumbel (``stgumbel``): the loss sees the hard sample obtained by argmax / thresholding
    the relaxed sample (exactly a sample of pi), while gradients flow through the relaxed sample.

    The objective is then an unbiased Monte-Carlo estimate of ``E_pi[loss]``; the gradient is biased.
    """

    straight_through = True
