"""The closed-form SparseMAP decompositions of the marginals and the KKT backward of every decomposition.

Shapes: float64 marginals ``mu [B, D]`` (and scores ``[B, D]``); a decomposition is bool vertices ``[B, C, D]`` and
weights ``[B, C]``: the threshold chain and systematic sampling (``"exact"``, ``C = D + 1``), the dyadic digit
planes (``C = L + 1``), and :func:`_closed_form`, which chooses ``"exact"`` / ``"dyadic"`` / ``"greedy"``
(:mod:`lvzoo.estimators.sparsemap_greedy`) / ``"auto"`` per example.
:class:`_KKTWeights` maps the weights ``[B, C]`` of any decomposition, ``"active_set"`` included, to a gradient
w.r.t. the scores ``[B, D]``. What the decompositions are and why: :mod:`lvzoo.estimators.sparsemap`.

**Backward.** :class:`_KKTWeights` differentiates the KKT system on the final active set (exact Jacobian):
``d xi_S / d t = (S - s s^T / sigma) Z_S`` with ``S = M_S^{-1}``, ``s = S 1``, ``sigma = 1^T S 1`` and ``Z_S`` the
active vertices ``[n, D]``, i.e. the gradient is ``y = Z_S^T x`` with ``x = argmin_{1^T x = 0} ||Z_S^T x||^2 -
g^T x``. Writing ``x`` through the differences of consecutive vertices turns this into ``<v_k - v_{k-1}, y> =
(g_k - g_{k-1}) / 2`` with ``y`` in the span of those differences, solved in closed form, O(B D) and without a
linear solve, for the chain (disjoint blocks) and for systematic sampling (single-bit moves ``e_j - e_{j-1}``:
cumulative sums over the fractional bits, zero-sum per segment; :func:`_path_kkt_direction`); the few systematic
examples whose breakpoints tie between separated bits, the dyadic planes, the greedy and the active-set solutions
use one batched dense solve of ``M_S`` (``torch.linalg.solve_ex``). For the closed-form decompositions this is the
derivative of the piecewise-linear construction where the active set is locally constant; for dyadic planes and the
greedy (whose vertices change under perturbations) and elsewhere it is the active-set derivative, as in the paper's
SparseMAP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lvzoo.estimators.sparsemap_active_set import _WORK_DTYPE, _dense_kkt_direction, _gram
from lvzoo.estimators.sparsemap_greedy import _greedy_decomposition

#: A dyadic vertex set counts as affinely independent when every Cholesky pivot of its Gram matrix exceeds this.
_MIN_PIVOT = 1e-3


def _chain_decomposition(mu: Tensor) -> tuple[Tensor, Tensor]:
    """Threshold-chain decomposition of ``mu [B, D]``: the rank of each bit ``[B, D]`` (vertex ``k`` turns on the
    bits of rank ``< k``, the top-``k`` bits) and weights ``[B, D + 1]`` (``m_k - m_{k+1}``, zero at ties)."""
    batch, dim = mu.shape
    levels, order = mu.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(dim, device=mu.device).expand(batch, dim)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    upper = torch.cat([torch.ones_like(levels[:, :1]), levels], dim=-1)
    lower = torch.cat([levels, torch.zeros_like(levels[:, :1])], dim=-1)
    return rank, upper - lower


class _Crossings(NamedTuple):
    """How the systematic-sampling vertices change with the offset (see :func:`_path_kkt_direction`).

    ``entered [B, D + 1]``: for boundary ``j`` (between bits ``j - 1`` and ``j``), the index of the active vertex
    entered when the offset crosses its fractional part, or -1 when that fraction is 0 (never crossed);
    ``fractional [B, D]``: bits with ``0 < mu < 1`` on the grid; ``path [B]``: no two separated runs of boundaries
    share a fraction, so the structured backward applies.
    """

    entered: Tensor
    fractional: Tensor
    path: Tensor


def _path_kkt_direction(crossings: _Crossings, grad_weights: Tensor) -> Tensor:
    """The backward ``Z_S^T (S - s s^T / sigma) g`` ``[B, D]`` of systematic-sampling vertices in O(B D), for the
    examples with ``crossings.path`` (zero for the others).

    Crossing boundary ``j`` changes the vertex by ``e_j - e_{j-1}``, so the gradient ``y`` w.r.t. the scores is the
    element of the span of these moves with ``<move, y> = (g_k - g_{k-1}) / 2`` for the vertex ``k`` it enters
    (the chain argument of :func:`_chain_kkt_direction`). Over the fractional bits in index order this reads
    ``y_next - y_prev = (g_k - g_{k-1}) / 2`` across each run of boundaries, restarts at runs of fraction 0, sums to
    zero on each segment between such runs, and ``-y_last = (g_k - g_{k-1}) / 2`` for a nonzero final fraction.
    """
    entered, fractional, path = crossings
    _batch, dim = fractional.shape
    half_steps = torch.cat([torch.zeros_like(grad_weights[:, :1]), grad_weights.diff(dim=-1) / 2], dim=-1)
    step_at = half_steps.gather(1, entered.clamp(0, grad_weights.shape[1] - 1)) * (entered >= 0)  # [B, D + 1]
    starts = fractional & (entered[:, :-1] < 0)
    segment = starts.cumsum(-1)  # [B, D]; every fractional bit follows a start
    running = (step_at[:, :-1] * fractional).cumsum(-1)
    at_start = torch.zeros_like(step_at).scatter(1, torch.where(starts, segment, 0), running)
    relative = (running - at_start.gather(1, segment)) * fractional
    totals = torch.zeros_like(step_at).scatter_add(1, segment, relative)
    sizes = torch.zeros_like(step_at).scatter_add(1, segment, fractional.to(step_at.dtype))
    offsets = -totals / sizes.clamp_min(1)
    last_bit = dim - 1 - fractional.flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    anchored_offset = -step_at[:, -1:] - relative.gather(1, last_bit)
    last_segment = segment[:, -1:]
    anchored = (entered[:, -1:] >= 0) & fractional.any(-1, keepdim=True)
    at_last_segment = torch.arange(dim + 1, device=segment.device) == last_segment
    offsets = torch.where(anchored & at_last_segment, anchored_offset, offsets)
    return (relative + offsets.gather(1, segment)) * fractional * path.unsqueeze(-1)


def _systematic_decomposition(mu: Tensor, budget: int, binding: Tensor) -> tuple[Tensor, Tensor, _Crossings]:
    """Systematic-sampling decomposition of ``mu [B, D]`` (``sum mu <= budget``): bool vertices ``[B, D + 1, D]`` with
    at most ``budget`` bits on and weights ``[B, D + 1]`` (zero for empty offset intervals).

    With ``c_j = mu_1 + ... + mu_j = n_j + f_j`` (integer and fractional parts, ``c_0 = 0``) and the offsets' sorted
    breakpoints ``f_(0) <= ... <= f_(D)``, the vertex of offset interval ``k = [f_(k), f_(k+1))`` has bit ``i`` equal
    to ``(n_i - n_{i-1}) + [rank(i) > k] - [rank(i-1) > k]``; all in exact int64 arithmetic on a dyadic grid.
    Where the budget is ``binding [B, 1]`` the grid total is made exactly ``budget`` (the bits with the largest
    rounding remainders are rounded up instead of down, so every marginal is within one grid tick), so every vertex
    has exactly ``budget`` bits on, as on the optimal face; an excess from float rounding (here and where the budget
    does not bind) is removed from the fractional bit with the most mass.

    Also returns the :class:`_Crossings` of the construction, for the structured backward.
    """
    batch, dim = mu.shape
    grid_bits = 52 - dim.bit_length()
    scale = 1 << grid_bits
    ticks = torch.floor(mu * scale).to(torch.int64)
    shortfall = budget * scale - ticks.sum(-1, keepdim=True)
    change = torch.where(binding, shortfall, shortfall.clamp(max=0))
    # largest remainders first: the floors' shortfall (fewer ticks than bits with a remainder) rounds those bits up
    remainder = torch.where(ticks < scale, mu * scale - ticks, -1.0)
    rank = remainder.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    rounded_up = (rank < change.clamp(min=0)) & (ticks < scale)
    ticks = ticks + rounded_up
    change = change - rounded_up.sum(-1, keepdim=True)  # 0, or an excess from float rounding of sum(mu)
    fractional = (ticks > 0) & (ticks < scale)
    most_room = torch.where(fractional, ticks, scale).argmin(-1, keepdim=True)
    most_mass = torch.where(fractional, ticks, -1).argmax(-1, keepdim=True)
    receiver = torch.where(change > 0, most_room, most_mass)
    ticks = ticks.scatter_add(-1, receiver, change).clamp(0, scale)
    cumulative = torch.cat([torch.zeros_like(ticks[:, :1]), ticks.cumsum(-1)], dim=-1)  # [B, D + 1]
    whole = cumulative >> grid_bits
    fraction = cumulative & (scale - 1)
    breakpoints, order = fraction.sort(dim=-1, stable=True)  # boundary 0 (fraction 0) stays first
    positions = torch.arange(dim + 1, device=mu.device).expand(batch, dim + 1)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    widths = torch.cat([breakpoints[:, 1:], torch.full_like(breakpoints[:, :1], scale)], dim=-1) - breakpoints
    after = (rank.unsqueeze(1) > positions.unsqueeze(2)).to(torch.int8)  # [B, k, j]: offset k precedes f_j
    wraps = (whole[:, 1:] - whole[:, :-1]).to(torch.int8).unsqueeze(1)
    bits = ((wraps + after[:, :, 1:] - after[:, :, :-1]) > 0) & (widths > 0).unsqueeze(-1)
    fractional = (ticks > 0) & (ticks < scale)
    new_value = torch.cat([torch.zeros_like(breakpoints[:, :1]), breakpoints[:, 1:] != breakpoints[:, :-1]], dim=-1)
    distinct_rank = new_value.cumsum(-1).gather(1, rank)  # [B, D + 1]: active vertex entered at boundary j
    entered = torch.where(fraction == 0, -1, distinct_rank)
    nonzero_runs = (fractional & (fraction[:, :-1] != 0)).sum(-1) + (fraction[:, -1] != 0)
    path = nonzero_runs == (widths > 0).sum(-1) - 1
    return bits, widths.to(mu.dtype) / scale, _Crossings(entered, fractional, path)


def _dyadic_decomposition(mu: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Digit-plane decomposition of ``mu [B, D]`` rounded to the grid ``q / 2^bits``: bool vertices
    ``[B, bits + 1, D]`` and weights ``[B, bits + 1]`` (duplicate planes merged into their first copy, zero
    elsewhere).

    With ``q' = min(q, 2^bits - 1)``, plane ``j = 1..bits`` holds the ``j``-th binary digit of ``q'`` and has weight
    ``2^-j``; the last plane ``[q = 2^bits]`` (the bits with ``mu = 1``) has weight ``2^-bits``. Bit ``i`` is then on
    with probability ``q_i / 2^bits`` exactly; the weights are powers of two, so merging is exact too. Also returns
    the planes' Gram matrix ``[B, bits + 1, bits + 1]`` (:func:`_gram`, all slots active).
    """
    scale = 1 << bits
    grid = torch.round(mu * scale).to(torch.int64)
    digits = grid.clamp(max=scale - 1)
    shifts = torch.arange(bits - 1, -1, -1, device=mu.device).view(1, -1, 1)
    planes = torch.cat([((digits.unsqueeze(1) >> shifts) & 1) > 0, (grid == scale).unsqueeze(1)], dim=1)
    powers = torch.cat([torch.arange(1, bits + 1, device=mu.device), torch.tensor([bits], device=mu.device)])
    weights = torch.pow(2.0, -powers.to(mu.dtype)).expand(mu.shape[0], bits + 1)
    gram = _gram(planes, torch.ones_like(weights, dtype=torch.bool))
    first_copy = (gram == mu.shape[1]).to(torch.int8).argmax(-1)  # the first plane at Hamming distance 0
    return planes, torch.zeros_like(weights).scatter_add(1, first_copy, weights), gram


def _affinely_independent(gram: Tensor, active: Tensor) -> Tensor:
    """``[B]`` bool: the active vertices of the Gram matrices ``gram [B, C, C]`` are affinely independent (``M_S``
    positive definite with every Cholesky pivot above ``_MIN_PIVOT``; nearly dependent sets are refused too, as
    their KKT backward is ill-conditioned)."""
    on = active.to(gram.dtype)
    masked = gram * (on.unsqueeze(2) * on.unsqueeze(1)) + torch.diag_embed(1 - on)
    factor, info = torch.linalg.cholesky_ex(masked)
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1)
    independent: Tensor = (info == 0) & (pivots > _MIN_PIVOT).all(-1)
    return independent


def _chain_kkt_direction(vertices: Tensor, active: Tensor, grad_weights: Tensor) -> Tensor:
    """``(S - s s^T / sigma) g`` ``[B, C]`` in O(B C) when the active vertices are a nested chain, smallest first.

    With blocks ``b_k = v_k - v_{k-1}`` (disjoint) and ``beta_k = sum_{l >= k} x_l``, the KKT direction
    ``x = argmin_{1^T x = 0} ||Z^T x||^2 - g^T x`` decouples: ``beta_k = (g_k - g_{k-1}) / (2 |b_k|)``.
    """
    sizes = vertices.sum(-1)
    block_sizes = (sizes[:, 1:] - sizes[:, :-1]).clamp_min(1)
    later = active[:, 1:]
    beta = torch.where(later, (grad_weights[:, 1:] - grad_weights[:, :-1]) / (2 * block_sizes), 0.0)
    beta = torch.cat([torch.zeros_like(beta[:, :1]), beta, torch.zeros_like(beta[:, :1])], dim=-1)
    return (beta[:, :-1] - beta[:, 1:]) * active


class _KKTWeights(torch.autograd.Function):
    """Identity on the solver's weights in the forward; the exact KKT Jacobian on the active set in the backward.

    Examples with ``nested [B]`` (a threshold chain, smallest vertex first) use the closed form
    :func:`_chain_kkt_direction`, those with ``crossings.path`` (systematic sampling without separated ties)
    :func:`_path_kkt_direction`; the others one batched dense solve over the first ``dense_slots`` slots (which
    hold all their active vertices).
    """

    @staticmethod
    def forward(
        scores: Tensor,
        vertices: Tensor,
        active: Tensor,
        weights: Tensor,
        nested: Tensor,
        crossings: _Crossings | None,
        dense_slots: int,
    ) -> Tensor:
        return weights.to(scores.dtype)

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, _Crossings | None, int], output: Tensor
    ) -> None:
        _, vertices, active, _, nested, crossings, dense_slots = inputs
        ctx.save_for_backward(vertices, active, nested, *(crossings or ()))
        ctx.dense_slots = dense_slots

    @staticmethod
    def backward(ctx: Any, grad_weights: Tensor) -> tuple[Tensor, None, None, None, None, None, None]:
        saved_vertices, active, nested, *crossing_tensors = ctx.saved_tensors
        crossings = _Crossings(*crossing_tensors) if crossing_tensors else None
        vertices = saved_vertices.to(_WORK_DTYPE)
        grad = grad_weights.to(_WORK_DTYPE)
        direction = _chain_kkt_direction(vertices, active & nested.unsqueeze(-1), grad)
        width = min(ctx.dense_slots, active.shape[1])
        dense_rows = ~nested if crossings is None else ~nested & ~crossings.path
        rows = _rows_where((active[:, :width] & dense_rows.unsqueeze(-1)).any(-1))
        if width > 0 and rows.numel() > 0:
            dense_active = active[rows, :width] & dense_rows[rows].unsqueeze(-1)
            dense = _dense_kkt_direction(vertices[rows, :width], dense_active, grad[rows, :width])
            direction = direction.index_add(0, rows, torch.nn.functional.pad(dense, (0, direction.shape[1] - width)))
        grad_scores = torch.einsum("bc,bcd->bd", direction, vertices)
        if crossings is not None:
            grad_scores = grad_scores + _path_kkt_direction(crossings, grad)
        return grad_scores.to(grad_weights.dtype), None, None, None, None, None, None


def _rows_where(mask: Tensor) -> Tensor:
    """Indices of the examples that need a batched linear-algebra step: on CPU only those with ``mask [B]`` set (a
    free check there), elsewhere all of them (no host sync); the callers mask the others out."""
    if mask.device.type == "cpu":
        return torch.nonzero(mask).squeeze(1)
    return torch.arange(mask.shape[0], device=mask.device)


#: ``vertices_at(slots [B, C']) -> bool [B, C', D]``: the vertices of the given slots of a decomposition.
VertexLookup = Callable[[Tensor], Tensor]


def _gather_slots(vertices: Tensor) -> VertexLookup:
    """A :data:`VertexLookup` into materialized ``vertices [B, C, D]``."""

    def vertices_at(slots: Tensor) -> Tensor:
        return vertices.gather(1, slots.unsqueeze(-1).expand(*slots.shape, vertices.shape[-1]))

    return vertices_at


def _closed_form(
    scores: Tensor, mu: Tensor, budget: int | None, decomposition: str, bits: int
) -> tuple[VertexLookup, Tensor, Tensor, _Crossings | None, int]:
    """The ``exact`` / ``dyadic`` / ``greedy`` / ``auto`` decompositions of ``mu [B, D]``, the closed-form marginals
    of float64 ``scores [B, D]`` under the effective ``budget``, to precision ``2^-(bits + 1)``: ``(vertices_at,
    weights [B, C], nested [B], crossings, dense_slots)``. The slots are the exact decomposition's ``D + 1`` followed
    (unless ``exact``) by the dyadic planes or the greedy vertices (``auto``: greedy); each example has weight on one
    of the two groups (the second where it is valid, affinely independent and, for ``auto``, sparser). Chain
    vertices are only built for the slots asked for."""
    dim = scores.shape[1]
    binding = ((scores + 1) / 2).clamp(0, 1).sum(-1, keepdim=True) > (budget or dim)
    crossings: _Crossings | None = None
    if budget is None:
        rank, weights = _chain_decomposition(mu)

        def exact_at(slots: Tensor) -> Tensor:
            return rank.unsqueeze(1) < slots.unsqueeze(-1)  # slot k is the top-k chain vertex

    else:
        vertices, weights, crossings = _systematic_decomposition(mu, budget, binding)
        exact_at = _gather_slots(vertices)  # type: ignore[assignment]
    nested = torch.full_like(weights[:, 0], budget is None, dtype=torch.bool)
    if decomposition == "exact":
        return exact_at, weights, nested, crossings, 0 if budget is None else dim + 1
    if decomposition == "dyadic":
        others, other_weights, gram = _dyadic_decomposition(mu, bits)
        on = other_weights > 0
        use = _within_budget(others, on, budget, binding)
    else:
        others, other_weights, use = _greedy_decomposition(mu, budget, binding, bits)
        on = other_weights > 0
        gram = _gram(others, on)
    if decomposition == "auto":
        use = use & (on.sum(-1) < (weights > 0).sum(-1))
    rows = _rows_where(use)
    use = use.index_put((rows,), _affinely_independent(gram[rows], on[rows]))
    chosen = use.unsqueeze(-1)
    weights = torch.cat([torch.where(chosen, 0.0, weights), torch.where(chosen, other_weights, 0.0)], dim=-1)
    other_at = _gather_slots(others)

    def vertices_at(slots: Tensor) -> Tensor:
        is_other = (slots > dim).unsqueeze(-1)
        return torch.where(is_other, other_at((slots - dim - 1).clamp(min=0)), exact_at(slots.clamp(max=dim)))

    if crossings is not None:
        crossings = crossings._replace(path=crossings.path & ~use)
    dense_slots = bits + 1 if budget is None and decomposition == "dyadic" else dim + 1
    return vertices_at, weights, nested & ~use, crossings, dense_slots


def _within_budget(planes: Tensor, on: Tensor, budget: int | None, binding: Tensor) -> Tensor:
    """``[B]``: every used plane of ``planes [B, C, D]`` (``on [B, C]``) is feasible, with exactly ``budget`` ones
    where it binds (``binding [B, 1]``), as on the optimal face."""
    if budget is None:
        return torch.ones_like(on[:, 0])
    sizes = planes.sum(-1)
    return (torch.where(binding, sizes == budget, sizes <= budget) | ~on).all(-1)
