"""Score-function (REINFORCE) estimators: SFE, SFE+ (self-critic), NVIL and Sum&Sample.

Each works for ``Categorical(K)`` and ``BitVector(D)`` without budget (see :mod:`lvzoo.estimators.distributions`)
and returns a surrogate whose gradient is an unbiased estimate of the gradient of ``E_pi[loss]`` w.r.t. both the
scores and the decoder parameters. Shapes: ``B`` examples, rows of width ``N = space.size``.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import EstimatorConfig, EstimatorResult, LossFn, evaluate_rows
from lvzoo.estimators.distributions import SamplingEstimator
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from lvzoo.estimators.validators import number_in, positive_int, positive_int_tuple


def _to_int_tuple(value: object) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ValueError(f"hidden_sizes must be a tuple of ints >= 1, got {value!r}")


def _one_row_each(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(example_index [B], support [B])`` for estimators that evaluate one row per example."""
    index = torch.arange(batch, device=device)
    return index, torch.ones(batch, dtype=torch.long, device=device)


@attrs.frozen
class SFEConfig(EstimatorConfig):
    """``baseline_decay`` in [0, 1): weight of the old value in the moving-average baseline."""

    baseline_decay: float = attrs.field(default=0.99, validator=number_in(0, 1, high_open=True))


class SFE(SamplingEstimator[SFEConfig]):
    """Score-function estimator with a moving-average baseline (``sfe``), 1 row per example.

    surrogate = loss(z) + (loss(z) - b).detach() * log pi(z), z ~ pi. ``b`` is the buffer ``baseline``: an
    exponential moving average of the batch-mean loss (initialised by the first batch), updated after each
    training-mode forward, so the ``b`` used by a step never depends on that step's samples.
    """

    config_class = SFEConfig
    baseline: Tensor
    baseline_updates: Tensor

    def __init__(
        self,
        space: LatentSpace,
        config: SFEConfig | None = None,
        *,
        input_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(space, config, input_dim=input_dim, generator=generator)
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update_baseline(self, batch_mean: Tensor) -> None:
        decay = self.config.baseline_decay
        moving = decay * self.baseline + (1.0 - decay) * batch_mean
        self.baseline.copy_(torch.where(self.baseline_updates > 0, moving, batch_mean))
        self.baseline_updates += 1

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]`` -> surrogate/objective/entropy/support ``[B]``; logs ``baseline``."""
        dist = self.distribution(scores)
        z = dist.sample(self.generator)
        index, support = _one_row_each(scores.shape[0], scores.device)
        losses = evaluate_rows(loss_fn, z, index, dist.categories(z))
        baseline = self.baseline.to(losses.dtype, copy=True)
        surrogate = losses + (losses - baseline).detach() * dist.log_prob(z)
        if self.training:
            self._update_baseline(losses.detach().mean())
        return EstimatorResult(
            surrogate=surrogate,
            objective=losses.detach(),
            entropy=dist.entropy(),
            support=support,
            logs={"baseline": baseline.detach()},
        )


@attrs.frozen
class SelfCriticConfig(EstimatorConfig):
    """SFE+ has no hyper-parameters."""


class SelfCriticSFE(SamplingEstimator[SelfCriticConfig]):
    """SFE with a self-critic baseline (``sfe+``), 2 rows per example.

    Two independent samples z, z' ~ pi; surrogate = loss(z) + (loss(z) - loss(z')).detach() * log pi(z).
    The objective is the mean of the two (both unbiased) Monte-Carlo losses.
    """

    config_class = SelfCriticConfig

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]`` -> surrogate/objective/entropy/support ``[B]``; loss rows ``[2B, N]`` interleaved."""
        dist = self.distribution(scores)
        batch = scores.shape[0]
        z = dist.sample(self.generator)
        z_critic = dist.sample(self.generator)
        rows = torch.stack([z, z_critic], dim=1).reshape(2 * batch, -1)
        index = torch.arange(batch, device=scores.device).repeat_interleave(2)
        losses = evaluate_rows(loss_fn, rows, index, dist.categories(rows)).reshape(batch, 2)
        loss, critic = losses[:, 0], losses[:, 1]
        surrogate = loss + (loss - critic).detach() * dist.log_prob(z)
        return EstimatorResult(
            surrogate=surrogate,
            objective=losses.detach().mean(-1),
            entropy=dist.entropy(),
            support=torch.full((batch,), 2, dtype=torch.long, device=scores.device),
            logs={"baseline": critic.detach().mean()},
        )


@attrs.frozen
class NVILConfig(EstimatorConfig):
    """``hidden_sizes``: ReLU hidden layers of the baseline MLP (the paper's code: 512, 512, 512)."""

    hidden_sizes: tuple[int, ...] = attrs.field(
        default=(512, 512, 512), converter=_to_int_tuple, validator=positive_int_tuple
    )


class NVIL(SamplingEstimator[NVILConfig]):
    """Score-function estimator with a learned, input-dependent baseline (``nvil``), 1 row per example.

    ``b(x)`` is an MLP ``input_dim -> hidden_sizes... -> 1`` (ReLU) on the flattened, detached encoder input.
    surrogate = loss(z) + (loss(z) - b(x)).detach() * log pi(z) + (b(x) - loss(z).detach())**2, so the baseline
    is trained by squared error through the same backward pass (add the estimator's parameters to the
    optimizer). NVIL's variance normalisation is not applied (Adam is largely invariant to the gradient scale).
    """

    config_class = NVILConfig

    def __init__(
        self,
        space: LatentSpace,
        config: NVILConfig | None = None,
        *,
        input_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(space, config, input_dim=input_dim, generator=generator)
        if input_dim is None or isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(
                f"NVIL needs input_dim, the flattened width (an int >= 1) of the encoder input its baseline "
                f"network reads, got {input_dim!r}"
            )
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in self.config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.baseline_net = nn.Sequential(*layers)

    def _baseline(self, encoder_input: Tensor | None, batch: int) -> Tensor:
        """``b(x)`` for ``encoder_input [B, ...]`` (flattened to ``[B, input_dim]``), ``[B]``."""
        if encoder_input is None:
            raise ValueError("NVIL needs encoder_input (its baseline b(x) reads it); got None")
        if encoder_input.dim() == 0 or encoder_input.shape[0] != batch:
            raise ValueError(
                f"NVIL expects encoder_input with leading dimension B={batch}, got shape {tuple(encoder_input.shape)}"
            )
        dtype = next(self.baseline_net.parameters()).dtype
        features = encoder_input.detach().reshape(batch, -1).to(dtype)
        if features.shape[1] != self.input_dim:
            raise ValueError(
                f"NVIL was built with input_dim={self.input_dim}, but encoder_input flattens to width "
                f"{features.shape[1]} (shape {tuple(encoder_input.shape)})"
            )
        baseline: Tensor = self.baseline_net(features).squeeze(-1)
        return baseline

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]``, ``encoder_input [B, ...]`` -> ``[B]`` results; logs ``baseline``, ``baseline_mse``."""
        dist = self.distribution(scores)
        batch = scores.shape[0]
        baseline = self._baseline(encoder_input, batch)
        z = dist.sample(self.generator)
        index, support = _one_row_each(batch, scores.device)
        losses = evaluate_rows(loss_fn, z, index, dist.categories(z))
        baseline = baseline.to(losses.dtype)
        squared_error = (baseline - losses.detach()) ** 2
        surrogate = losses + (losses - baseline).detach() * dist.log_prob(z) + squared_error
        return EstimatorResult(
            surrogate=surrogate,
            objective=losses.detach(),
            entropy=dist.entropy(),
            support=support,
            logs={"baseline": baseline.detach().mean(), "baseline_mse": squared_error.detach().mean()},
        )


@attrs.frozen
class SumAndSampleConfig(EstimatorConfig):
    """``top_k``: assignments summed exactly (the paper's code: 1); bit vectors support 1 only."""

    top_k: int = attrs.field(default=1, validator=positive_int)


class SumAndSample(SamplingEstimator[SumAndSampleConfig]):
    """Sum&Sample (Liu et al. 2019, ``sumsample``): ``top_k + 1`` rows per example, unbiased.

    With S the ``top_k`` most probable assignments (for bit vectors the MAP) and z' drawn from pi restricted to
    the complement of S (renormalised; exact, rejection-free), the surrogate is
    ``sum_{z in S} pi(z) loss(z) + w * (loss(z') + loss(z').detach() * log pi(z'))`` with
    ``w = 1 - pi(S)`` detached; its expected gradient is the exact gradient of ``E_pi[loss]``.
    Logs ``summed_mass`` (mean of pi(S)).
    """

    config_class = SumAndSampleConfig

    def __init__(
        self,
        space: LatentSpace,
        config: SumAndSampleConfig | None = None,
        *,
        input_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(space, config, input_dim=input_dim, generator=generator)
        top_k = self.config.top_k
        if isinstance(space, Categorical) and top_k >= space.K:
            raise ValueError(f"top_k must be in [1, K-1={space.K - 1}] for {space!r}, got top_k={top_k}")
        if isinstance(space, BitVector) and top_k != 1:
            raise ValueError(f"Sum&Sample on bit vectors supports top_k=1 (the MAP) only, got top_k={top_k}")

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, N]`` -> ``[B]`` results; loss rows ``[B*(top_k+1), N]`` grouped by example."""
        dist = self.distribution(scores)
        batch, width = scores.shape
        top_k = self.config.top_k
        split = dist.top_k_split(top_k, self.generator)
        rows = torch.cat([split.top_rows, split.complement_sample.unsqueeze(1)], dim=1).reshape(-1, width)
        index = torch.arange(batch, device=scores.device).repeat_interleave(top_k + 1)
        losses = evaluate_rows(loss_fn, rows, index, dist.categories(rows)).reshape(batch, top_k + 1)
        top_losses, sampled_loss = losses[:, :top_k], losses[:, top_k]
        top_probs = split.top_log_probs.exp()
        rest_mass = split.complement_log_mass.exp()
        sampled_log_prob = dist.log_prob(split.complement_sample)
        surrogate = (top_probs * top_losses).sum(-1) + rest_mass * (
            sampled_loss + sampled_loss.detach() * sampled_log_prob
        )
        objective = (top_probs * top_losses).detach().sum(-1) + rest_mass * sampled_loss.detach()
        return EstimatorResult(
            surrogate=surrogate,
            objective=objective,
            entropy=dist.entropy(),
            support=torch.full((batch,), top_k + 1, dtype=torch.long, device=scores.device),
            logs={"summed_mass": top_probs.detach().sum(-1).mean()},
        )
