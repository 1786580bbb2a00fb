"""SparseMAP over bit vectors (Niculae et al. 2018; Correia et al. 2020, Sec. 4.2), as a batched torch solver.

``lp-sparsemap`` cannot be installed here, so this module solves the same problem with the same semantics.

**Encoding (the paper's / lpsmap's).** Each of the ``D`` bits is an on/off pair: a vertex ``z in {0,1}^D`` is
lifted to ``a_z = (z, 1 - z) in R^{2D}`` with scores ``(t, 0)``, so ``s_z = <z, t>``. SparseMAP is the QP over the
simplex of all feasible vertices (``sum(z) <= budget`` when a budget is given)::

    xi* = argmin_{xi in simplex} 1/2 ||A xi||^2 - <s, xi>,      A = [a_z]_z,  M = A^T A,  M_zz' = D - Hamming(z, z')

It depends on ``xi`` only through the marginals ``mu = sum_z xi_z z``: per bit ``1/2 (mu^2 + (1 - mu)^2) - t mu``.
Hence the marginals are unique and in closed form (:func:`sparsemap_marginals`): ``mu = clip((t + 1) / 2, 0, 1)``;
with a budget, the Euclidean projection of ``(t + 1) / 2`` onto ``{mu in [0,1]^D, sum(mu) <= budget}``, i.e.
``clip((t + 1) / 2 - lam, 0, 1)`` with ``lam >= 0`` found exactly by sorting. The distribution ``xi`` is not unique;
this module returns one with at most ``D + 1`` affinely independent vertices (Caratheodory).

**Decompositions** (``SparseMAPConfig.decomposition``). Any convex combination of feasible vertices with the
closed-form marginals is optimal, so the solver only has to choose one, with at most ``D + 1`` affinely independent
vertices (so that the KKT backward is well defined), deterministically and within the budget:

* ``"exact"``: without budget the *threshold chain*: sort ``mu`` decreasingly (``m_1 >= ... >= m_D``,
  ``m_0 = 1``, ``m_{D+1} = 0``); vertex ``k`` turns on the top-``k`` bits, with weight ``m_k - m_{k+1}``; zero
  weights (ties) are dropped. The vertices are nested, hence affinely independent. With a budget, *systematic
  sampling*: lay the ``mu_i`` end to end on ``[0, sum mu)`` and, for an offset ``u in [0, 1)``, turn bit ``i`` on
  iff its segment contains a point of ``u + Z``. Every such vertex has ``floor`` or ``ceil`` of ``sum mu <= budget``
  bits on, bit ``i`` is on for a fraction ``mu_i`` of the offsets, and the vertex only changes where ``u`` crosses a
  fractional part of a cumulative sum: at most ``D + 1`` vertices whose consecutive differences (``e_j - e_{j-1}``
  moves) are linearly independent. It runs in exact int64 arithmetic on the dyadic grid ``2^-(52 - bitlength(D))``
  (marginals exact to ~1e-13). Both use (number of distinct fractional marginal levels) + 1 vertices, and that is
  the minimum for *any* exact decomposition of generic scores: each ``mu_i`` must be a subset sum of the weights, so
  ``1`` and the ``m`` distinct fractional levels (linearly independent over the rationals for generic scores) lie
  in the rational span of the ``n`` weights, hence ``n >= m + 1``. Pairing complementary bits or a "staircase"
  therefore cannot beat the chain unless marginals coincide exactly.
* ``"dyadic"``: a decomposition that is exact *to the precision of the scores' dtype* needs far fewer vertices,
  because then the weights only have to reproduce ``mu`` on the grid ``2^-L``. Round ``mu`` to ``q / 2^L`` and take
  the binary digit planes of ``q``: plane ``j`` turns on the bits whose ``j``-th binary digit is 1 and has weight
  ``2^-j``, plus one plane ``[mu = 1]`` of weight ``2^-L``; identical planes are merged. That is at most ``L + 1``
  vertices whatever ``D`` (``L = dyadic_bits``, by default the mantissa of the scores' dtype: 24 for float32, 52
  for float64 -- rounding error ``2^-(L+1)``, below that of casting the chain's weights to the dtype). Planes are
  used only where they are affinely independent (Cholesky pivots of their Gram matrix ``> 1e-3``) and, with a
  budget, where every plane has at most ``budget`` ones (exactly ``budget`` when it binds, as on the optimal face;
  digit planes rarely satisfy this once the budget binds, so budgeted SparseMAP mostly stays systematic); other
  examples fall back to ``"exact"``.
* ``"auto"`` (default): per example the sparser of the two.
* ``"active_set"``: the paper's solver, started from the MAP vertex: a batched primal active-set method (Nocedal &
  Wright 16.4-16.5; Martins et al. AD3, Sec. 6), lockstep over the batch with ``D + 1`` masked slots. Each
  iteration either certifies / adds (MAP oracle on ``r = t + 1 - 2 mu``; done when the Frank-Wolfe gap
  ``max_z <z, r> - <mu, r> <= tol * max(1, max|t|)``, else the oracle vertex joins the active set) or steps towards
  the solution of the equality-constrained KKT system ``[[M_S, 1], [1^T, 0]] [xi; tau] = [s_S; 1]`` with the
  blocking-constraint ratio test. It stops at a ``tol``-certified point (marginals accurate to ~1e-10), with host
  syncs every ``_CHECK_EVERY`` iterations and tens to hundreds of KKT solves. It also finds sparse supports for the
  same reason as ``"dyadic"`` (it only has to hit the marginals to ~1e-10), but slowly.

Support (mean vertices per example, 16 examples, no budget, ``t ~ N(0, s^2)``; forward solver time on this shared
2-core CPU in brackets; the budget column is ``budget = D / 2`` with ``"exact"`` / ``"auto"``)::

    ====  ======  ============  ==============  ==============  ======================  ==============
    D     s       exact         auto, float32   auto, float64*  active_set, float64*    budget D / 2
    ====  ======  ============  ==============  ==============  ======================  ==============
    32    0.25    32.9 (2 ms)   25.0 (4 ms)     31.3 (6 ms)     28.6 (44 ms)            32.4 / 32.4
    32    1       22.6 (<1 ms)  22.4 (1 ms)     22.6 (2 ms)     22.3 (30 ms)            22.4 / 22.4
    32    4       7.3 (<1 ms)   7.3 (1 ms)      7.3 (2 ms)      7.3 (16 ms)             7.5 / 7.5
    128   0.25    128.9 (1 ms)  25.0 (2 ms)     33.6 (4 ms)     50.9 (736 ms)           128.4 / 128.4
    128   1       87.4 (1 ms)   25.0 (2 ms)     31.6 (4 ms)     41.4 (695 ms)           86.5 / 86.5
    128   4       27.1 (1 ms)   24.1 (2 ms)     26.6 (5 ms)     24.8 (437 ms)           27.2 / 26.5
    ====  ======  ============  ==============  ==============  ======================  ==============

    * float32 draws cast to float64: their marginals have ~25 significant bits, so the lower digit planes are all
      zero and merge (genuine float64 scores give up to 53 planes).

For the bit-vector VAE each vertex is a decoder row (a 784-pixel likelihood and its backward), which costs more
than the extra solver time of ``"auto"`` (about +2 ms per batch on CPU at B = 64, D = 32 and B = 16, D = 128): at
D = 128 in float32 it evaluates ~3.5x fewer rows than ``"exact"`` (25 instead of ~87 per example at ``s = 1``);
at D = 32 the chain is usually already sparser than 25 planes and ``"auto"`` keeps it. Hence the default.

**Backward.** :class:`_KKTWeights` differentiates the KKT system on the final active set (exact Jacobian):
``d xi_S / d t = (S - s s^T / sigma) Z_S`` with ``S = M_S^{-1}``, ``s = S 1``, ``sigma = 1^T S 1`` and ``Z_S`` the
active vertices ``[n, D]``, i.e. the gradient is ``y = Z_S^T x`` with ``x = argmin_{1^T x = 0} ||Z_S^T x||^2 -
g^T x``. Writing ``x`` through the differences of consecutive vertices turns this into ``<v_k - v_{k-1}, y> =
(g_k - g_{k-1}) / 2`` with ``y`` in the span of those differences, solved in closed form, O(B D) and without a
linear solve, for the chain (disjoint blocks) and for systematic sampling (single-bit moves ``e_j - e_{j-1}``:
cumulative sums over the fractional bits, zero-sum per segment; :func:`_path_kkt_direction`); the few systematic
examples whose breakpoints tie between separated bits, the dyadic planes and the active-set solutions use one
batched dense solve of ``M_S`` (``torch.linalg.solve_ex``). For the closed-form decompositions this is the
derivative of the piecewise-linear construction where the active set is locally constant; for dyadic planes (whose
digits change under any perturbation) and elsewhere it is the active-set derivative, as in the paper's SparseMAP.

**Host syncs.** None for the closed-form decompositions on an accelerator (they return ``D + 1`` slots, active
first; :meth:`SparseMAP.distribution` then has the one inherent ``nonzero``). On CPU, where reading a tensor is
free, the slots are trimmed to the largest support and the batched linear algebra runs only on the examples that
need it. All solver and KKT arithmetic runs in float64; vertices and weights are returned in the scores' dtype. No
random numbers are used; the result is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, MarginalizingEstimator, SparseDistribution
from lvzoo.estimators.spaces import BitVector
from lvzoo.estimators.validators import int_in, number_in, one_of, optional, positive_int

#: After the first iteration, convergence (a host sync) is checked every this many iterations.
_CHECK_EVERY = 4

_WORK_DTYPE = torch.float64


#: The ways of choosing the SparseMAP distribution (see the module docstring).
DECOMPOSITIONS = ("auto", "dyadic", "exact", "active_set")

#: Largest dyadic precision: grid points ``q / 2^bits`` stay exact in float64 and int64.
MAX_DYADIC_BITS = 52

#: A dyadic vertex set counts as affinely independent when every Cholesky pivot of its Gram matrix exceeds this.
_MIN_PIVOT = 1e-3


@attrs.frozen
class SparseMAPConfig(EstimatorConfig):
    """``decomposition``: one of :data:`DECOMPOSITIONS` (default ``"auto"``: per example the sparser of
    ``"dyadic"`` and ``"exact"``); ``dyadic_bits``: precision of the dyadic grid (``None``: the mantissa of the
    scores' dtype, 24 for float32, capped at 52); ``max_iter``: iterations of the ``"active_set"`` solver (>= 1);
    ``tol``: its Frank-Wolfe gap tolerance, relative to ``max(1, max|t|)``, in (0, 1)."""

    decomposition: str = attrs.field(default="auto", validator=one_of(*DECOMPOSITIONS))
    dyadic_bits: int | None = attrs.field(default=None, validator=optional(int_in(1, MAX_DYADIC_BITS)))
    max_iter: int = attrs.field(default=300, validator=positive_int)
    tol: float = attrs.field(default=1e-9, validator=number_in(0, 1, low_open=True, high_open=True))


@attrs.frozen
class SparseMAPSolution:
    """A solver result with ``C`` slots, active slots first (at most ``D + 1`` active per example).

    ``vertices [B, C, D]`` (0/1) and ``weights [B, C]`` (differentiable w.r.t. the scores, zero on inactive slots)
    in the scores' dtype, ``active [B, C]`` bool, ``iterations`` of the active-set solver (0 for the closed-form
    decompositions), ``converged [B]`` bool. On CPU ``C`` is the largest support in the batch; on other devices it
    is ``D + 1``, so that no host sync is needed.
    """

    vertices: Tensor
    weights: Tensor
    active: Tensor
    iterations: int
    converged: Tensor


def _effective_budget(budget: int | None, dim: int) -> int | None:
    """The validated budget, or ``None`` when it does not constrain ``dim`` bits."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 or None, got {budget!r}")
    return None if budget >= dim else budget


def sparsemap_marginals(t: Tensor, budget: int | None = None) -> Tensor:
    """Closed-form SparseMAP marginals ``mu [B, D]`` for scores ``t [B, D]`` (differentiable).

    ``clip((t + 1) / 2, 0, 1)``, or with a budget its projection ``clip((t + 1) / 2 - lam, 0, 1)`` onto
    ``sum(mu) <= budget``. ``lam`` is exact: the breakpoints ``u_i`` and ``u_i - 1`` are sorted, the segment where
    ``sum clip(u - lam, 0, 1)`` crosses the budget is located, and ``lam = (sum_free u + n_ones - budget) / n_free``.
    """
    u = (t + 1) / 2
    dim = t.shape[-1]
    budget = _effective_budget(budget, dim)
    unconstrained = u.clamp(0, 1)
    if budget is None:
        return unconstrained
    with torch.no_grad():
        ascending = u.sort(dim=-1).values
        prefix = torch.cat([torch.zeros_like(u[:, :1]), ascending.cumsum(-1)], dim=-1)  # [B, D + 1]
        candidates = torch.cat([torch.zeros_like(u[:, :1]), u, u - 1], dim=-1).clamp_min(0).sort(dim=-1).values
        below_low = torch.searchsorted(ascending, candidates, right=True)  # #{u_i <= lam}
        below_high = torch.searchsorted(ascending, candidates + 1)  # #{u_i < lam + 1}
        inside = prefix.gather(-1, below_high) - prefix.gather(-1, below_low)
        mass = (dim - below_high) + inside - (below_high - below_low) * candidates  # sum clip(u - lam, 0, 1)
        first_within = (mass <= budget).to(torch.int64).argmax(dim=-1, keepdim=True).clamp_min(1)
        low = candidates.gather(-1, first_within - 1)
        high = candidates.gather(-1, first_within)
        middle = (low + high) / 2
        free = (u > middle) & (u < middle + 1)
        ones = u >= middle + 1
    free_sum = (u * free).sum(-1, keepdim=True)
    lam = (free_sum + ones.sum(-1, keepdim=True) - budget) / free.sum(-1, keepdim=True).clamp_min(1)
    binding = unconstrained.sum(-1, keepdim=True) > budget
    lam = torch.where(binding, lam, torch.zeros_like(lam))
    return (u - lam).clamp(0, 1)


def _map_oracle(r: Tensor, budget: int | None, tie: Tensor | float = 0.0) -> Tensor:
    """Highest-scoring feasible vertex ``argmax_z <z, r>``, ``r [B, D]`` -> 0/1 ``[B, D]``.

    Bits with ``r_i <= tie`` (``[B, 1]`` or a float) stay off, so that entries equal to zero up to rounding are
    resolved the same way under tiny perturbations of the scores.
    """
    if budget is None:
        return (r > tie).to(r.dtype)
    top_values, top_index = r.topk(budget, dim=-1)
    return torch.zeros_like(r).scatter(-1, top_index, (top_values > tie).to(r.dtype))


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
    Where the budget is ``binding [B, 1]`` the grid total is made exactly ``budget`` (the rounding shortfall goes to
    the fractional bit with the most room), so every vertex has exactly ``budget`` bits on, as on the optimal face;
    elsewhere only an excess from float rounding is removed.

    Also returns the :class:`_Crossings` of the construction, for the structured backward.
    """
    batch, dim = mu.shape
    grid_bits = 52 - dim.bit_length()
    scale = 1 << grid_bits
    ticks = torch.floor(mu * scale).to(torch.int64)
    shortfall = budget * scale - ticks.sum(-1, keepdim=True)
    change = torch.where(binding, shortfall, shortfall.clamp(max=0))
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


def _active_set(
    scores: Tensor, budget: int | None, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
    """The paper's primal active-set solver from the MAP vertex (module docstring), on float64 ``scores [B, D]``:
    ``(vertices [B, D + 1, D], weights [B, D + 1], active, iterations, converged [B])``."""
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
    scores: Tensor, budget: int | None, decomposition: str, dyadic_bits: int
) -> tuple[VertexLookup, Tensor, Tensor, _Crossings | None, int]:
    """The ``exact`` / ``dyadic`` / ``auto`` decompositions of the closed-form marginals of float64 ``scores``:
    ``(vertices_at, weights [B, C], nested [B], crossings, dense_slots)``. The slots are the exact decomposition's
    ``D + 1`` followed (unless ``exact``) by the dyadic planes; each example has weight on one of the two groups.
    Chain vertices are only built for the slots asked for."""
    dim = scores.shape[1]
    mu = sparsemap_marginals(scores, budget)
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
    planes, plane_weights, plane_gram = _dyadic_decomposition(mu, dyadic_bits)
    on = plane_weights > 0
    if budget is None:
        use = torch.ones_like(nested)
    else:  # on the optimal face every vertex has exactly ``budget`` ones when the budget binds
        sizes = planes.sum(-1)
        use = (torch.where(binding, sizes == budget, sizes <= budget) | ~on).all(-1)
    if decomposition == "auto":
        use = use & (on.sum(-1) < (weights > 0).sum(-1))
    rows = _rows_where(use)
    use = use.index_put((rows,), _affinely_independent(plane_gram[rows], on[rows]))
    chosen = use.unsqueeze(-1)
    weights = torch.cat([torch.where(chosen, 0.0, weights), torch.where(chosen, plane_weights, 0.0)], dim=-1)
    plane_at = _gather_slots(planes)

    def vertices_at(slots: Tensor) -> Tensor:
        is_plane = (slots > dim).unsqueeze(-1)
        return torch.where(is_plane, plane_at((slots - dim - 1).clamp(min=0)), exact_at(slots.clamp(max=dim)))

    if crossings is not None:
        crossings = crossings._replace(path=crossings.path & ~use)
    return vertices_at, weights, nested & ~use, crossings, dyadic_bits + 1 if budget is None else dim + 1


def solve_sparsemap(
    t: Tensor,
    budget: int | None = None,
    *,
    decomposition: str = "auto",
    dyadic_bits: int | None = None,
    max_iter: int = 300,
    tol: float = 1e-9,
) -> SparseMAPSolution:
    """SparseMAP of bit-vector scores ``t [B, D]`` (optionally ``sum(z) <= budget``); see the module docstring.

    ``decomposition`` is one of :data:`DECOMPOSITIONS`; ``dyadic_bits`` defaults to the mantissa bits of ``t``'s
    dtype (capped at :data:`MAX_DYADIC_BITS`); ``max_iter`` and ``tol`` only apply to ``"active_set"``.
    """
    if t.dim() != 2:
        raise ValueError(f"scores must be [B, D], got shape {tuple(t.shape)}")
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    dim = t.shape[1]
    budget = _effective_budget(budget, dim)
    if dyadic_bits is None:
        dyadic_bits = min(1 - int(math.log2(torch.finfo(t.dtype).eps)), MAX_DYADIC_BITS)
    with torch.no_grad():
        scores = t.detach().to(_WORK_DTYPE)
        if decomposition == "active_set":
            vertices, weights, active, iterations, converged = _active_set(scores, budget, max_iter, tol)
            vertices_at = _gather_slots(vertices)
            nested = torch.zeros_like(converged)
            crossings = None
            dense_slots = dim + 1
        else:
            vertices_at, weights, nested, crossings, dense_slots = _closed_form(
                scores, budget, decomposition, dyadic_bits
            )
            active = weights > 0
            iterations, converged = 0, torch.ones_like(nested)
        order = (~active).to(torch.int8).argsort(dim=-1, stable=True)
        # at most D + 1 active slots; on CPU (no device to wait for) trim to the largest support in the batch
        width = max(1, int(active.sum(-1).max())) if t.device.type == "cpu" else dim + 1
        order = order[:, :width]
        dense_slots = min(dense_slots, order.shape[1])
        vertices = vertices_at(order).to(t.dtype)
        active = active.gather(1, order)
        weights = weights.gather(1, order) * active
    differentiable = _KKTWeights.apply(t, vertices, active, weights, nested, crossings, dense_slots)
    return SparseMAPSolution(
        vertices=vertices,
        weights=differentiable,
        active=active,
        iterations=iterations,
        converged=converged,
    )


def sparsemap(t: Tensor, budget: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SparseMAP with default settings: ``(vertices [B, C, D], weights [B, C], active [B, C])``, ``C <= D + 1``;
    ``weights`` is differentiable w.r.t. ``t``."""
    solution = solve_sparsemap(t, budget)
    return solution.vertices, solution.weights, solution.active


class SparseMAP(MarginalizingEstimator[SparseMAPConfig]):
    """Sparse marginalization over the SparseMAP distribution of bit-vector scores (``space.budget`` respected).

    The loss is evaluated once on the vertices with positive weight (at most ``D + 1`` per example). Logs:
    ``sparsemap_iterations`` (solver iterations), ``sparsemap_mean_support`` and ``sparsemap_converged`` (fraction
    of examples certified within ``max_iter``).
    """

    config_class: ClassVar[type[EstimatorConfig]] = SparseMAPConfig
    supported_spaces = (BitVector,)

    def distribution(self, scores: Tensor) -> SparseDistribution:
        """The vertices with positive SparseMAP weight for scores ``[B, D]`` (at most ``D + 1`` per example)."""
        space = self.space
        assert isinstance(space, BitVector)  # the base class refused any other space
        solution = solve_sparsemap(
            scores,
            space.budget,
            decomposition=self.config.decomposition,
            dyadic_bits=self.config.dyadic_bits,
            max_iter=self.config.max_iter,
            tol=self.config.tol,
        )
        kept = solution.active & (solution.weights > 0)
        example_index, slot = torch.nonzero(kept, as_tuple=True)  # the one (inherent) sync: the number of rows
        support = kept.sum(-1)
        return SparseDistribution(
            z_rows=solution.vertices[example_index, slot],
            example_index=example_index,
            probs=solution.weights[example_index, slot],
            num_examples=scores.shape[0],
            logs={
                "sparsemap_iterations": scores.new_full((), float(solution.iterations)),  # a fill: no copy
                "sparsemap_mean_support": support.to(scores.dtype).mean(),
                "sparsemap_converged": solution.converged.to(scores.dtype).mean(),
            },
        )


__all__ = [
    "DECOMPOSITIONS",
    "SparseMAP",
    "SparseMAPConfig",
    "SparseMAPSolution",
    "solve_sparsemap",
    "sparsemap",
    "sparsemap_marginals",
]
