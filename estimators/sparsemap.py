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

**Solver.** A batched primal active-set method (Nocedal & Wright 16.4-16.5; Martins et al. AD3, Sec. 6), lockstep over
the batch with a fixed capacity of ``D + 1`` vertex slots per example (masked; finished examples stop changing).
One iteration does, per example, either

* *certificate / add* (when ``xi`` is optimal on its active set ``S``): call the MAP oracle on
  ``r = t + 1 - 2 mu`` (``-r`` is, up to a constant, the gradient ``<a_z, A xi> - s_z`` w.r.t. ``xi_z``). The
  Frank-Wolfe gap ``max_z <z, r> - <mu, r>`` bounds the suboptimality; if it is ``<= tol * max(1, max|t|)`` the
  example is done, otherwise the oracle vertex is added (it is then affinely independent of ``S``, so ``|S| <= D + 1``
  always; a full set is declared done), or
* *step*: solve the equality-constrained KKT system ``[[M_S, 1], [1^T, 0]] [xi; tau] = [s_S; 1]`` (batched
  ``torch.linalg.solve_ex``; empty slots are padded identity rows), move towards its solution with the
  blocking-constraint ratio test and drop the blocking vertex when the step is shorter than 1.

The oracles are exact: bit ``i`` on iff ``r_i > 0``; with a budget, the top-``budget`` positive entries.
The only host syncs are a convergence check (``done.all()``) after the first iteration and then every
``_CHECK_EVERY`` iterations, and one at the end to trim the slots to the largest support in the batch.
No random numbers are used; the result is deterministic.

**Warm starts** (default; ``warm_start=False`` starts from the MAP vertex like the paper's solver). Both are exact
decompositions of the closed-form marginals into affinely independent vertices, which are therefore optimal on
their active set, so the solver only has to certify them (one oracle call, no KKT solve in the forward pass):

* no budget: the *threshold chain*: sort ``mu`` decreasingly (``m_1 >= ... >= m_D``, ``m_0 = 1``,
  ``m_{D+1} = 0``); vertex ``k`` turns on the top-``k`` bits, with weight ``m_k - m_{k+1}``; zero weights (ties)
  are dropped. The vertices are nested, hence affinely independent.
* budget: *systematic sampling*: lay the ``mu_i`` end to end on ``[0, sum mu)`` and, for an offset ``u in [0, 1)``,
  turn bit ``i`` on iff its segment contains a point of ``u + Z``. Every such vertex has ``floor`` or ``ceil`` of
  ``sum mu <= budget`` bits on, bit ``i`` is on for a fraction ``mu_i`` of the offsets, and the vertex only changes
  where ``u`` crosses a fractional part of a cumulative sum: at most ``D + 1`` vertices whose consecutive
  differences (``e_{i+1} - e_i`` paths) are linearly independent. To make it exact, ``mu`` is rounded down to a
  dyadic grid (``2^-(52 - bitlength(D))``, all cumulative sums in int64); the certificate then measures the
  (negligible, ~1e-12) rounding.

The two starts return different, equally valid SparseMAP distributions (``xi`` is not unique). The warm start is the
exact optimum; its support is the number of distinct marginal levels plus one, so for scores with many fractional
bits it approaches ``D + 1``. The MAP start stops at the first ``tol``-certified point, which is typically much
sparser (e.g. ~50 instead of ~120 vertices for ``D = 128``, ``t ~ N(0, 0.25)``) with marginals accurate to ~1e-10,
but costs tens to hundreds of KKT solves.

**Backward.** :class:`_KKTWeights` differentiates the KKT system on the final active set (exact Jacobian):
``d xi_S / d t = (S - s s^T / sigma) Z_S`` with ``S = M_S^{-1}``, ``s = S 1``, ``sigma = 1^T S 1`` and ``Z_S`` the
active vertices ``[n, D]``. The matrix ``S - s s^T / sigma`` is the top-left block of the KKT inverse, so the
backward is one batched KKT solve with right-hand side ``[g; 0]``. For the warm starts this is the derivative of the
piecewise-linear construction. Where the active set is not locally constant (ties between marginal levels, a
marginal exactly at 0 or 1, or a budget exactly met at a kink) it is the one-sided derivative for the active set the
solver returned. All solver and KKT arithmetic runs in float64; vertices and weights are returned in the scores'
dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, MarginalizingEstimator, SparseDistribution
from lvzoo.estimators.spaces import BitVector

#: After the first iteration, convergence (a host sync) is checked every this many iterations.
_CHECK_EVERY = 4

_WORK_DTYPE = torch.float64


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


def _unit_interval(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{attribute.name} must be a float in (0, 1), got {value!r}")


def _boolean(instance: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be True or False, got {value!r}")


@attrs.frozen
class SparseMAPConfig(EstimatorConfig):
    """``max_iter``: active-set iterations (>= 1); ``tol``: Frank-Wolfe gap tolerance, relative to
    ``max(1, max|t|)``, in (0, 1); ``warm_start``: start from the exact closed-form decomposition (True) or from
    the MAP vertex like the paper's solver (False)."""

    max_iter: int = attrs.field(default=300, validator=_positive_int)
    tol: float = attrs.field(default=1e-9, validator=_unit_interval)
    warm_start: bool = attrs.field(default=True, validator=_boolean)


@attrs.frozen
class SparseMAPSolution:
    """A solver result with ``C <= D + 1`` slots, active slots first.

    ``vertices [B, C, D]`` (0/1) and ``weights [B, C]`` (differentiable w.r.t. the scores, zero on inactive slots)
    in the scores' dtype, ``active [B, C]`` bool, ``iterations`` run, ``converged [B]`` bool.
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
    """Threshold-chain decomposition of ``mu [B, D]``: vertices ``[B, D + 1, D]`` (vertex ``k`` = top-``k`` bits)
    and weights ``[B, D + 1]`` (``m_k - m_{k+1}``, zero at ties)."""
    batch, dim = mu.shape
    levels, order = mu.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(dim, device=mu.device).expand(batch, dim)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    upper = torch.cat([torch.ones_like(levels[:, :1]), levels], dim=-1)
    lower = torch.cat([levels, torch.zeros_like(levels[:, :1])], dim=-1)
    sizes = torch.arange(dim + 1, device=mu.device)
    vertices = (rank.unsqueeze(1) < sizes.view(1, -1, 1)).to(mu.dtype)
    return vertices, upper - lower


def _systematic_decomposition(mu: Tensor, budget: int, binding: Tensor) -> tuple[Tensor, Tensor]:
    """Systematic-sampling decomposition of ``mu [B, D]`` (``sum mu <= budget``): vertices ``[B, D + 1, D]`` with
    at most ``budget`` bits on and weights ``[B, D + 1]`` (zero for empty offset intervals).

    With ``c_j = mu_1 + ... + mu_j = n_j + f_j`` (integer and fractional parts, ``c_0 = 0``) and the offsets' sorted
    breakpoints ``f_(0) <= ... <= f_(D)``, the vertex of offset interval ``k = [f_(k), f_(k+1))`` has bit ``i`` equal
    to ``(n_i - n_{i-1}) + [rank(i) > k] - [rank(i-1) > k]``; all in exact int64 arithmetic on a dyadic grid.
    Where the budget is ``binding [B, 1]`` the grid total is made exactly ``budget`` (the rounding shortfall goes to
    the fractional bit with the most room), so every vertex has exactly ``budget`` bits on, as on the optimal face;
    elsewhere only an excess from float rounding is removed.
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
    bits = (wraps + after[:, :, 1:] - after[:, :, :-1]).clamp_(0, 1) * (widths > 0).unsqueeze(-1)
    return bits.to(mu.dtype), widths.to(mu.dtype) / scale


def _kkt_matrix(vertices: Tensor, active: Tensor) -> Tensor:
    """KKT matrices ``[[M_S, 1], [1^T, 0]]`` ``[B, C + 1, C + 1]``; inactive slots become identity rows."""
    batch, capacity, dim = vertices.shape
    on = active.to(vertices.dtype)
    sizes = vertices.sum(-1)
    bits = vertices.to(torch.float32)  # 0/1 inner products are exact in float32 and twice as fast
    overlaps = (bits @ bits.transpose(1, 2)).to(vertices.dtype)
    gram = dim - sizes.unsqueeze(2) - sizes.unsqueeze(1) + 2 * overlaps
    gram = gram * (on.unsqueeze(2) * on.unsqueeze(1)) + torch.diag_embed(1 - on)
    top = torch.cat([gram, on.unsqueeze(2)], dim=2)
    bottom = torch.cat([on.unsqueeze(1), vertices.new_zeros(batch, 1, 1)], dim=2)
    return torch.cat([top, bottom], dim=1)


def _kkt_solve(vertices: Tensor, active: Tensor, top_rhs: Tensor, last_rhs: float) -> Tensor:
    """Solve the KKT system with right-hand side ``[top_rhs (masked); last_rhs]``; the ``[B, C]`` primal part."""
    on = active.to(vertices.dtype)
    rhs = torch.cat([top_rhs * on, torch.full_like(on[:, :1], last_rhs)], dim=-1)
    solved: tuple[Tensor, Tensor] = torch.linalg.solve_ex(
        _kkt_matrix(vertices, active), rhs.unsqueeze(-1), check_errors=False
    )
    return solved[0][:, :-1, 0] * on


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

    ``nested`` (every example's active set is a threshold chain, smallest vertex first) selects the closed-form
    solve :func:`_chain_kkt_direction`; otherwise one batched dense KKT solve.
    """

    @staticmethod
    def forward(scores: Tensor, vertices: Tensor, active: Tensor, weights: Tensor, nested: bool) -> Tensor:
        return weights.to(scores.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor, Tensor, bool], output: Tensor) -> None:
        _, vertices, active, _, nested = inputs
        ctx.save_for_backward(vertices, active)
        ctx.nested = nested

    @staticmethod
    def backward(ctx: Any, grad_weights: Tensor) -> tuple[Tensor, None, None, None, None]:
        vertices, active = ctx.saved_tensors
        grad = grad_weights.to(vertices.dtype)
        if ctx.nested:
            direction = _chain_kkt_direction(vertices, active, grad)
        else:
            direction = _kkt_solve(vertices, active, grad, 0.0)
        grad_scores = torch.einsum("bc,bcd->bd", direction, vertices)
        return grad_scores.to(grad_weights.dtype), None, None, None, None


def solve_sparsemap(
    t: Tensor,
    budget: int | None = None,
    *,
    max_iter: int = 300,
    tol: float = 1e-9,
    warm_start: bool = True,
) -> SparseMAPSolution:
    """SparseMAP of bit-vector scores ``t [B, D]`` (optionally ``sum(z) <= budget``); see the module docstring."""
    if t.dim() != 2:
        raise ValueError(f"scores must be [B, D], got shape {tuple(t.shape)}")
    batch, dim = t.shape
    budget = _effective_budget(budget, dim)
    capacity = dim + 1
    slots = torch.arange(capacity, device=t.device)
    with torch.no_grad():
        scores = t.detach().to(_WORK_DTYPE)
        if warm_start:
            mu = sparsemap_marginals(scores, budget)
            if budget is None:
                vertices, weights = _chain_decomposition(mu)
            else:
                binding = ((scores + 1) / 2).clamp(0, 1).sum(-1, keepdim=True) > budget
                vertices, weights = _systematic_decomposition(mu, budget, binding)
            active = weights > 0
        else:
            vertices = scores.new_zeros(batch, capacity, dim)
            vertices[:, 0] = _map_oracle(scores, budget)
            weights = (slots == 0).to(_WORK_DTYPE).expand(batch, capacity).clone()
            active = slots.expand(batch, capacity) == 0
        magnitude = scores.abs().amax(-1).clamp_min(1)
        threshold = tol * magnitude
        tie = (16 * dim * torch.finfo(_WORK_DTYPE).eps * magnitude).unsqueeze(-1)
        stationary = torch.ones(batch, dtype=torch.bool, device=t.device)
        done = torch.zeros_like(stationary)
        iterations = 0
        certified_at_start = False
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
                certified_at_start = iteration == 0
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
        order = (~active).to(torch.int8).argsort(dim=-1, stable=True)
        width = max(1, int(active.sum(-1).max()))
        order = order[:, :width]
        vertices = vertices.gather(1, order.unsqueeze(-1).expand(batch, width, dim))
        active = active.gather(1, order)
        weights = weights.gather(1, order) * active
    nested = warm_start and budget is None and certified_at_start
    differentiable = _KKTWeights.apply(t, vertices, active, weights, nested)
    return SparseMAPSolution(
        vertices=vertices.to(t.dtype),
        weights=differentiable,
        active=active,
        iterations=iterations,
        converged=done,
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
            max_iter=self.config.max_iter,
            tol=self.config.tol,
            warm_start=self.config.warm_start,
        )
        example_index, slot = torch.nonzero(solution.active & (solution.weights > 0), as_tuple=True)
        support = torch.bincount(example_index, minlength=scores.shape[0])
        return SparseDistribution(
            z_rows=solution.vertices[example_index, slot],
            example_index=example_index,
            probs=solution.weights[example_index, slot],
            num_examples=scores.shape[0],
            logs={
                "sparsemap_iterations": torch.tensor(float(solution.iterations), device=scores.device),
                "sparsemap_mean_support": support.to(scores.dtype).mean(),
                "sparsemap_converged": solution.converged.to(scores.dtype).mean(),
            },
        )


__all__ = [
    "SparseMAP",
    "SparseMAPConfig",
    "SparseMAPSolution",
    "solve_sparsemap",
    "sparsemap",
    "sparsemap_marginals",
]
