"""Exact-enumeration oracle for small latent spaces (K <= ~16 categories, D <= ~10 bits).

``exact_expectation`` computes ``E_{p(z|scores)}[loss(z)]`` by evaluating the loss on **every** assignment, so its
autograd gradient is the exact gradient every estimator is compared against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace


class QuadraticDecoderLoss(nn.Module):
    """A small learnable downstream loss: ``loss(z, b) = ||tanh(z W + c) - y_b||^2 + <z, u_b>``.

    Non-linear in z (so no estimator is exact by accident), with parameters (to check decoder gradients) and
    per-example targets ``y [B, H]`` and tilts ``u [B, N]``.
    """

    def __init__(self, space: LatentSpace, batch: int, hidden: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = space.size
        self.weight = nn.Parameter(torch.randn(n, hidden, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64) * 0.1)
        self.register_buffer("targets", torch.randn(batch, hidden, generator=g, dtype=torch.float64))
        self.register_buffer("tilts", torch.randn(batch, n, generator=g, dtype=torch.float64))
        self.calls = 0
        self.rows = 0

    def forward(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        """``z_rows [R, N]``, ``example_index [R]`` -> ``[R]``; counts calls and rows."""
        self.calls += 1
        self.rows += z_rows.shape[0]
        z = z_rows.to(self.weight.dtype)
        out = torch.tanh(z @ self.weight + self.bias)
        targets: Tensor = self.targets  # type: ignore[assignment]
        tilts: Tensor = self.tilts  # type: ignore[assignment]
        return ((out - targets[example_index]) ** 2).sum(-1) + (z * tilts[example_index]).sum(-1)


def gibbs_probs(space: LatentSpace, scores: Tensor) -> Tensor:
    """The dense Gibbs distribution over ``space.enumerate()``: ``softmax(<a_z, t>)``, ``[B, N_assignments]``.

    For a categorical space this is ``softmax(scores)``; for bit vectors (no budget) it is the product of
    independent Bernoulli(sigmoid(t_i)).
    """
    table = space.enumerate().to(scores)
    return torch.softmax(scores @ table.T, dim=-1)


def exact_expectation(
    space: LatentSpace,
    probs: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``sum_z probs[b, z] * loss(z, b)`` over all assignments, ``[B]``; ``probs`` is ``[B, N_assignments]``."""
    table = space.enumerate().to(probs)
    batch, count = probs.shape
    rows = table.repeat(batch, 1)
    index = torch.arange(batch, device=probs.device).repeat_interleave(count)
    losses = loss_fn(rows, index).reshape(batch, count)
    return (probs * losses).sum(-1)


def exact_gradient(
    space: LatentSpace,
    scores: Tensor,
    probs_fn: Callable[[Tensor], Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """Exact ``d/dscores sum_b E_{probs_fn(scores)_b}[loss]``, ``[B, N]``."""
    leaf = scores.detach().clone().requires_grad_(True)
    value = exact_expectation(space, probs_fn(leaf), loss_fn).sum()
    (grad,) = torch.autograd.grad(value, leaf)
    return grad


__all__ = [
    "BitVector",
    "Categorical",
    "QuadraticDecoderLoss",
    "exact_expectation",
    "exact_gradient",
    "gibbs_probs",
]
