"""Baselines of the score-function estimators, as objects (:class:`Baseline`), chosen by name in their config.

A baseline ``b`` centres the learning signal of each sampled row: the score term is ``(loss - b) * log pi(z)``.
It may read the losses of extra, independent draws (``extra_samples``, e.g. the self-critic's second sample), the
encoder input (the learned baseline) or its own running state (the moving average); it never reads the loss of
the row it centres, so the estimate stays unbiased (the leave-one-out baseline reads the *other* sampled rows,
which are independent of it). :class:`SignalNormalizer` is NVIL's variance normalisation of the centred signal.
Shapes: ``B`` examples, ``S`` sampled rows per example, ``E`` extra rows per example.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs
import torch
from torch import Tensor, nn


@attrs.frozen
class BaselineValue:
    """``value`` (detached, broadcastable to ``[B, S]``), ``penalty [B]`` (a differentiable term added to the
    surrogate, e.g. the learned baseline's squared error; ``0`` for none) and scalar ``logs``."""

    value: Tensor
    penalty: Tensor | float = 0.0
    logs: Mapping[str, Tensor] = attrs.field(factory=dict)


class Baseline(nn.Module, abc.ABC):
    """A baseline for ``S`` sampled rows per example; :meth:`forward` returns its :class:`BaselineValue`."""

    #: Independent draws per example, besides the ``S`` sampled rows, whose losses the baseline reads.
    extra_samples: ClassVar[int] = 0

    @abc.abstractmethod
    def forward(
        self, losses: Tensor, extra_losses: Tensor, encoder_input: Tensor | None, generator: torch.Generator | None
    ) -> BaselineValue:
        """Baseline for the detached ``losses [B, S]`` given ``extra_losses [B, E]`` and ``encoder_input [B, ...]``;
        ``generator`` (the estimator's, or ``None`` for the default one) drives any randomness."""

    def __call__(
        self, losses: Tensor, extra_losses: Tensor, encoder_input: Tensor | None, generator: torch.Generator | None
    ) -> BaselineValue:
        value: BaselineValue = super().__call__(losses, extra_losses, encoder_input, generator)
        return value


class NoBaseline(Baseline):
    """``b = 0`` (plain REINFORCE)."""

    def forward(
        self, losses: Tensor, extra_losses: Tensor, encoder_input: Tensor | None, generator: torch.Generator | None
    ) -> BaselineValue:
        return BaselineValue(value=losses.new_zeros(()))


class MovingAverageBaseline(Baseline):
    """Exponential moving average of the batch-mean loss (``decay``: weight of the old value, in [0, 1)).

    Initialised by the first training batch and updated after each training-mode forward, so the ``b`` a step uses
    never depends on that step's samples. State: the buffers ``value`` and ``updates`` (saved in the state dict).
    """

    value: Tensor
    updates: Tensor

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(
        self, losses: Tensor, extra_losses: Tensor, encoder_input: Tensor | None, generator: torch.Generator | None
    ) -> BaselineValue:
        baseline = self.value.to(losses.dtype, copy=True)
        if self.training:
            with torch.no_grad():
                batch_mean = losses.mean().to(self.value.dtype)
                moving = self.decay * self.value + (1.0 - self.decay) * batch_mean
                self.value.copy_(torch.where(self.updates > 0, moving, batch_mean))
                self.updates += 1
        return BaselineValue(value=baseline, logs={"baseline": baseline})


class SelfCriticBaseline(Baseline):
    """The loss of one more independent draw (SFE+, "self-critic"): ``b = loss(z')`` for every sampled row."""

    extra_samples = 1

    def forward(
        self, losses: Tensor, extra_losses: Tensor, encoder_input: Tensor | None, generator: torch.Generator | None
    ) -> BaselineValue:
        return BaselineValue(value=extra_losses, logs={"baseline": extra_losses.mean()})


class LeaveOneOutBaseline(Baseline):
    """RLOO (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free!"): the baseline of
    sampled row ``s`` is the mean loss of the other ``S - 1`` sampled rows, ``b_s = (sum_j loss_j - loss_s) / (S - 1)``.

    The other rows are independent draws, so ``E[b_s grad log pi(z_s)] = 0``; needs ``samples >= 2``.
    """

    def __init__(self, samples: int) -> None:
        super().__init__()
        if samples < 2:
            raise ValueError(
                f"the leave_one_out baseline needs samples >= 2 (each sampled row is centred by the mean loss of "
                f"the other samples), got samples={samples}"
            )
        self.samples = samples

    def forward(
        self, losses: Tensor, extra_losses: Tensor, encoder_input: Tensor | None, generator: torch.Generator | None
    ) -> BaselineValue:
        if losses.shape[-1] != self.samples:
            raise ValueError(f"expected losses of {self.samples} samples per example, got shape {tuple(losses.shape)}")
        others = (losses.sum(-1, keepdim=True) - losses) / (self.samples - 1)
        return BaselineValue(value=others, logs={"baseline": others.mean()})


class LearnedBaseline(Baseline):
    """NVIL's input-dependent baseline ``b(x)``: a ReLU MLP ``width -> hidden_sizes... -> 1`` on the flattened,
    detached encoder input, trained by the squared error ``(b(x) - mean_s loss_s)^2`` added to the surrogate.

    The first layer is sized lazily (:class:`torch.nn.LazyLinear`, so an optimizer built before the first forward
    holds its parameters) from the first encoder input, so nothing needs the input width up front; a loaded state
    dict materialises it too. Its initial values (PyTorch's default ``U(-1/sqrt(width), 1/sqrt(width))``) are drawn
    from the estimator's generator, so a forward draws from that generator only.
    """

    def __init__(self, hidden_sizes: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index, hidden in enumerate(hidden_sizes):
            layers += [nn.LazyLinear(hidden) if index == 0 else nn.Linear(hidden_sizes[index - 1], hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden_sizes[-1], 1) if hidden_sizes else nn.LazyLinear(1))
        self.net = nn.Sequential(*layers)

    def _features(self, encoder_input: Tensor | None, batch: int, generator: torch.Generator | None) -> Tensor:
        if encoder_input is None:
            raise ValueError("the learned baseline b(x) needs encoder_input; got None")
        if encoder_input.dim() == 0 or encoder_input.shape[0] != batch:
            raise ValueError(
                f"the learned baseline expects encoder_input with leading dimension B={batch}, "
                f"got shape {tuple(encoder_input.shape)}"
            )
        first = self.net[0]
        assert isinstance(first, nn.Linear)  # LazyLinear too
        features = encoder_input.detach().reshape(batch, -1)
        if isinstance(first.weight, nn.parameter.UninitializedParameter):
            self._size_first_layer(first, features.shape[1], generator)
        if features.shape[1] != first.weight.shape[1]:
            raise ValueError(
                f"the learned baseline was sized for encoder inputs of width {first.weight.shape[1]}, but "
                f"encoder_input flattens to width {features.shape[1]} (shape {tuple(encoder_input.shape)})"
            )
        return features.to(first.weight.dtype)

    @staticmethod
    @torch.no_grad()
    def _size_first_layer(layer: nn.Linear, width: int, generator: torch.Generator | None) -> None:
        """Materialise the lazy ``layer`` for inputs of ``width`` with PyTorch's default initial distribution."""
        bound = 1.0 / math.sqrt(width)
        layer.in_features = width
        for param, shape in ((layer.weight, (layer.out_features, width)), (layer.bias, (layer.out_features,))):
            assert isinstance(param, nn.parameter.UninitializedParameter)
            param.materialize(shape)
            param.uniform_(-bound, bound, generator=generator)

    def forward(
        self, losses: Tensor, extra_losses: Tensor, encoder_input: Tensor | None, generator: torch.Generator | None
    ) -> BaselineValue:
        features = self._features(encoder_input, losses.shape[0], generator)
        predicted: Tensor = self.net(features).squeeze(-1).to(losses.dtype)
        squared_error = (predicted - losses.mean(-1)) ** 2
        return BaselineValue(
            value=predicted.detach().unsqueeze(-1),
            penalty=squared_error,
            logs={"baseline": predicted.detach().mean(), "baseline_mse": squared_error.detach().mean()},
        )


def make_baseline(name: str, *, decay: float, hidden_sizes: Sequence[int], samples: int = 1) -> Baseline:
    """The :class:`Baseline` called ``name``: ``none``, ``moving_average``, ``self_critic``, ``learned`` or
    ``leave_one_out`` (which needs ``samples >= 2`` sampled rows per example)."""
    if name == "none":
        return NoBaseline()
    if name == "moving_average":
        return MovingAverageBaseline(decay)
    if name == "self_critic":
        return SelfCriticBaseline()
    if name == "learned":
        return LearnedBaseline(hidden_sizes)
    if name == "leave_one_out":
        return LeaveOneOutBaseline(samples)
    raise ValueError(f"unknown baseline {name!r}; accepted: none, moving_average, self_critic, learned, leave_one_out")


class SignalNormalizer(nn.Module):
    """NVIL's variance normalisation (Mnih & Gregor 2014, section 3.3 / appendix): the centred learning signal
    ``loss - b`` is divided by ``max(1, sqrt(v))``, ``v`` an exponential moving average of its variance.

    ``decay`` is the weight of the old value (the paper's smoothing factor alpha = 0.8). The variance of a batch is
    that of all its centred signals ``[B, S]`` around their mean. Like :class:`MovingAverageBaseline`, ``v`` is
    initialised by the first training batch and updated after each training-mode forward, so the scale a step
    uses never depends on that step's samples: the score term is the unbiased one divided by a positive constant.
    The ``max(1, .)`` only ever shrinks the signal (small signals are not amplified), as in the paper. State: the
    buffers ``variance`` and ``updates``.
    """

    variance: Tensor
    updates: Tensor

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("variance", torch.ones(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, signal: Tensor) -> tuple[Tensor, Tensor]:
        """``(signal / scale, scale)`` for the detached centred ``signal [B, S]``; ``scale`` is a scalar tensor."""
        scale = self.variance.to(signal.dtype, copy=True).sqrt().clamp_min(1.0)
        if self.training:
            with torch.no_grad():
                batch_variance = signal.var(unbiased=False).to(self.variance.dtype)
                moving = self.decay * self.variance + (1.0 - self.decay) * batch_variance
                self.variance.copy_(torch.where(self.updates > 0, moving, batch_variance))
                self.updates += 1
        return signal / scale, scale
