"""The greedy SparseMAP decomposition (``decomposition="greedy"``): a largest-step Caratheodory greedy, stopped as
soon as the rest of the marginals is within the precision of the scores' dtype.

Shapes: float64 marginals ``mu [B, D]`` (the closed-form SparseMAP marginals, ``sum(mu) <= budget``); the result is
bool vertices ``[B, S, D]`` and float64 weights ``[B, S]`` with ``S <= D + 2`` steps (zero weight on the steps an
example did not take).

**Method.** Start with the residual point ``x = mu`` and residual mass ``rho = 1``. Each step picks a feasible
vertex ``v`` close to ``x``: ``v = [x >= 1/2]`` (at most ``budget`` ones: else, and wherever the budget binds, the
top-``budget`` bits of ``x``). It then takes the largest weight ``w`` for which the rest
``y = (x - w v) / (1 - w)`` stays feasible: ``w = min(min_{v_i = 1} x_i, min_{v_i = 0} 1 - x_i)``, and, while the
budget does not bind yet and ``|v| < budget``, ``w <= (budget - sum x) / (budget - |v|)`` (when this caps ``w``,
``y`` lies on the face ``sum = budget`` and the budget binds from then on). The step emits ``(v, rho w)`` and
continues with ``x = y``, ``rho = rho (1 - w)``; the coordinates that block ``w`` become exactly 0 or 1. The identity
``mu = sum_t rho_t w_t v_t + rho_T x_T`` is exact, so the greedy can stop at any step by emitting ``(v, rho)``: the
marginal error is then ``rho max_i |x_i - v_i|``, and it stops as soon as that is at most ``2^-(bits + 1)``, the
rounding error of the scores' dtype (``bits`` = its mantissa: 24 for float32). That is the only approximation.

**Why it is sparse.** Without a budget ``w >= 1/2`` (each ``x_i`` is within ``1/2`` of ``v_i``), so ``rho``
halves at least at every step and the greedy stops after at most ``bits + 1`` vertices, like the dyadic planes,
but usually earlier, because each step also fixes at least one coordinate (equal marginals stay equal), which bounds
it by the threshold chain's (number of distinct fractional levels) + 1 too. With a budget the steps are about as
large in practice (``w ~ 0.45``), where the exact systematic decomposition needs one vertex per distinct level.

**Validity.** Each vertex differs, at a coordinate it fixes (or in its number of ones, for the capped step), from
all later vertices, which agree there; so the vertices are distinct and affinely independent. Where the budget
binds every vertex has exactly ``budget`` ones. :func:`_greedy_decomposition` also reports, per example, whether the
recomposed marginals are within the precision (a check of the floating-point arithmetic; the caller falls back to
the exact decomposition where it fails).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lvzoo.estimators.sparsemap_active_set import _CHECK_EVERY

#: Rounding allowance of the float64 recomposition ``sum_t w_t v_t`` in the validity check of the greedy.
_RECOMPOSITION_SLACK = 1e-13


def _greedy_vertex(x: Tensor, budget: int | None, binding: Tensor) -> Tensor:
    """The vertex ``[B, D]`` (bool) of a greedy step from the residual point ``x [B, D]``: ``[x >= 1/2]``, or the
    top-``budget`` bits of ``x`` where the budget binds (``binding [B]``) or ``[x >= 1/2]`` has too many ones."""
    rounded = x >= 0.5
    if budget is None:
        return rounded
    top = torch.zeros_like(rounded).scatter_(1, x.topk(budget, dim=-1, sorted=False).indices, True)
    return torch.where((binding | (rounded.sum(-1) > budget)).unsqueeze(-1), top, rounded)


def _greedy_decomposition(mu: Tensor, budget: int | None, binding: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """The greedy decomposition of ``mu [B, D]`` (see the module docstring) under the effective ``budget``, where
    ``binding [B, 1]`` tells the examples on the face ``sum(mu) = budget``; precision ``2^-(bits + 1)``.

    Returns bool vertices ``[B, S, D]``, float64 weights ``[B, S]`` (summing to 1) and ``valid [B]``: the recomposed
    marginals are within the precision (up to :data:`_RECOMPOSITION_SLACK`).
    """
    batch, dim = mu.shape
    precision = 2.0 ** -(bits + 1)
    limit = dim if budget is None else budget
    on_cpu = mu.device.type == "cpu"
    binding = binding.reshape(batch) & (budget is not None)
    x = mu.clone()
    rho = torch.ones_like(mu[:, 0])
    stopped = torch.zeros_like(binding)
    vertices: list[Tensor] = []
    weights: list[Tensor] = []
    for step in range(dim + 2):
        vertex = _greedy_vertex(x, budget, binding)
        ones = vertex.to(x.dtype)
        room = torch.where(vertex, x, 1 - x)
        width = room.amin(-1)
        capped = torch.zeros_like(stopped)
        if budget is not None:
            size = ones.sum(-1)
            open_face = ~binding & (size < limit)
            cap = (limit - x.sum(-1)).clamp_min(0) / (limit - size).clamp_min(1)
            capped = open_face & (cap < width)
            width = torch.where(capped, cap, width)
        last = step == dim + 1
        stop = ~stopped & ((rho * (x - ones).abs().amax(-1) <= precision) | (width >= 1) | last)
        moving = ~stopped & ~stop
        vertices.append(vertex & ~stopped.unsqueeze(-1))
        weights.append(torch.where(stop, rho, torch.where(moving, rho * width, 0.0)))
        step_width = torch.where(moving, width, 0.0).unsqueeze(-1)
        rest = (x - step_width * ones) / (1 - step_width)
        blocked = (moving & ~capped).unsqueeze(-1) & (room <= width.unsqueeze(-1))
        x = torch.where(blocked, 1 - ones, rest).clamp(0, 1)
        rho = rho * (1 - step_width.squeeze(-1))
        binding = binding | capped
        stopped = stopped | stop
        # off CPU a host sync every _CHECK_EVERY steps, as in the active set; on CPU (free) at every step
        if (on_cpu or step % _CHECK_EVERY == _CHECK_EVERY - 1) and bool(stopped.all()):
            break
    stacked, weight = torch.stack(vertices, dim=1), torch.stack(weights, dim=1)
    error = (torch.einsum("bs,bsd->bd", weight, stacked.to(weight.dtype)) - mu).abs().amax(-1)
    return stacked, weight, error <= precision + _RECOMPOSITION_SLACK
