"""The batched KKT linear algebra of SparseMAP and its active-set solver (``decomposition="active_set"``).

Shapes: float64 scores ``[B, D]``; vertex sets are 0/1 (or bool) ``vertices [B, C, D]`` with ``active [B, C]``
slots, their Gram matrices ``M_S`` ``[B, C, C]``, and weights / KKT directions ``[B, C]``. :func:`_active_set`
works in lockstep over the batch with ``C = D + 1`` masked slots. The method and its stopping rule are described
in :mod:`lvzoo.estimators.sparsemap`; the dense backward :func:`_dense_kkt_direction` also serves the dyadic
decompositions (:mod:`lvzoo.estimators.sparsemap_decompositions`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: After the first iteration, convergence (a host sync) is checked every this many iterations.
_CHECK_EVERY = 4

#: All solver and KKT arithmetic runs in this dtype.
_WORK_DTYPE = torch.float64


def _map_oracle(r: Tensor, budget: int | None, tie: Tensor | float = 0.0) -> Tensor:
    """Highest-scoring feasible vertex ``argmax_z <z, r>``, ``r [B, D]`` -> 0/1 ``[B, D]``.

    Bits with ``r_i <= tie`` (``[B, 1]`` or a float) stay off, so that entries equal to zero up to rounding are
    resolved the same way under tiny perturbations of the scores.
    """
    if budget is None:
        return (r > tie).to(r.dtype)
    top_values, top_index = r.topk(budget, dim=-1)
    return torch.zeros_like(r).scatter(-1, top_index, (top_values > tie).to(r.dtype))


def _gram(vertices: Tensor, active: Tensor) -> Tensor:
    """``M_S = A_S^T A_S`` (``D - Hamming``) of 0/1 (or bool) ``vertices [B, C, D]``, float64 ``[B, C, C]``;
    inactive slots become identity rows. The 0/1 inner products are exact in float32 and twice as fast."""
    dim = vertices.shape[-1]
    bits = vertices.to(torch.float32)
    on = active.to(_WORK_DTYPE)
    sizes = bits.sum(-1).to(_WORK_DTYPE)
    overlaps = (bits @ bits.transpose(1, 2)).to(_WORK_DTYPE)
    gram = dim - sizes.unsqueeze(2) - sizes.unsqueeze(1) + 2 * overlaps
    return gram * (on.unsqueeze(2) * on.unsqueeze(1)) + torch.diag_embed(1 - on)


def _kkt_solve(vertices: Tensor, active: Tensor, top_rhs: Tensor, last_rhs: float) -> Tensor:
    """Solve ``[[M_S, 1], [1^T, 0]] [x; tau] = [top_rhs (masked); last_rhs]``; the ``[B, C]`` primal part."""
    on = active.to(_WORK_DTYPE)
    batch = on.shape[0]
    gram = _gram(vertices, active)
    top = torch.cat([gram, on.unsqueeze(2)], dim=2)
    bottom = torch.cat([on.unsqueeze(1), on.new_zeros(batch, 1, 1)], dim=2)
    rhs = torch.cat([top_rhs * on, torch.full_like(on[:, :1], last_rhs)], dim=-1)
    solved: tuple[Tensor, Tensor] = torch.linalg.solve_ex(
        torch.cat([top, bottom], dim=1), rhs.unsqueeze(-1), check_errors=False
    )
    return solved[0][:, :-1, 0] * on


def _dense_kkt_direction(vertices: Tensor, active: Tensor, grad_weights: Tensor) -> Tensor:
    """``(S - s s^T / sigma) g`` ``[B, C]`` with ``S = M_S^{-1}``, ``s = S 1``, ``sigma = 1^T s``: one batched solve
    of ``M_S`` with the two right-hand sides ``g`` and ``1`` (the KKT matrix's top-left inverse block)."""
    on = active.to(_WORK_DTYPE)
    rhs = torch.stack([grad_weights * on, on], dim=-1)  # [B, C, 2]
    solved: tuple[Tensor, Tensor] = torch.linalg.solve_ex(_gram(vertices, active), rhs, check_errors=False)
    inverse_g, inverse_ones = solved[0].unbind(-1)
    sigma = inverse_ones.sum(-1, keepdim=True).clamp_min(torch.finfo(on.dtype).tiny)
    return (inverse_g - inverse_ones * (inverse_ones * grad_weights).sum(-1, keepdim=True) / sigma) * on


def _active_set(
    scores: Tensor, budget: int | None, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
    """The paper's primal active-set solver from the MAP vertex (see :mod:`lvzoo.estimators.sparsemap`), on float64
    ``scores [B, D]``: ``(vertices [B, D + 1, D], weights [B, D + 1], active, iterations, converged [B])``."""
    batch, dim = scores.shape
    capacity = dim + 1
    slots = torch.arange(capacity, device=scores.device)
    vertices = scores.new_zeros(batch, capacity, dim)
    vertices[:, 0] = _map_oracle(scores, budget)
    weights = (slots == 0).to(scores.dtype).expand(batch, capacity).clone()
    active = slots.expand(batch, capacity) == 0
    magnitude = scores.abs().amax(-1).clamp_min(1)
    threshold = tol * magnitude
    tie = (16 * dim * torch.finfo(scores.dtype).eps * magnitude).unsqueeze(-1)
    stationary = torch.ones(batch, dtype=torch.bool, device=scores.device)
    done = torch.zeros_like(stationary)
    iterations = 0
    for iteration in range(max_iter):
        iterations = iteration + 1
        # certificate / add, for examples whose weights are optimal on their active set
        mu = torch.einsum("bc,bcd->bd", weights, vertices)
        residual = scores + 1 - 2 * mu
        candidate = _map_oracle(residual, budget, tie)
        gap = ((candidate - mu) * residual).sum(-1)
        certify = stationary & ~done
        finished = certify & ((gap <= threshold) | active.all(-1))
        add = certify & ~finished
        done = done | finished
        if (iteration == 0 or iterations % _CHECK_EVERY == 0) and bool(done.all()):
            break
        free_slot = (~active).to(torch.int64).argmax(-1, keepdim=True)
        placed = (slots == free_slot) & add.unsqueeze(-1)
        vertices = torch.where(placed.unsqueeze(-1), candidate.unsqueeze(1), vertices)
        active = active | placed
        stationary = stationary & ~add
        # step towards the equality-constrained optimum on the active set
        linear_scores = torch.einsum("bcd,bd->bc", vertices, scores)
        target = _kkt_solve(vertices, active, linear_scores, 1.0)
        blocking = active & (target < 0)
        ratios = torch.where(blocking, weights / (weights - target), torch.full_like(weights, 2.0))
        step, blocker = ratios.min(-1, keepdim=True)
        full = step >= 1
        step = step.clamp(max=1)
        moved = (weights + step * (target - weights)).clamp_min(0)
        dropped = ~full & (slots == blocker)
        move = ~stationary & ~done
        keep = active & ~dropped
        weights = torch.where(move.unsqueeze(-1), moved * keep, weights)
        active = torch.where(move.unsqueeze(-1), keep, active)
        stationary = torch.where(move, full.squeeze(-1), stationary)
    return vertices, weights, active, iterations, done
