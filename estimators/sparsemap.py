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
* Exact only *to the precision of the scores' dtype*, far fewer vertices suffice, because the weights then only
  have to reproduce ``mu`` to ``2^-(L+1)`` (``L = precision_bits``: by default the mantissa of the dtype, 24 for
  float32, capped at 40 for float64, i.e. ~4.5e-13, far below the active set's typical ~1e-10):

  * ``"greedy"``: a largest-step Caratheodory greedy, stopped as soon as the rest is within ``2^-(L+1)``
    (:mod:`lvzoo.estimators.sparsemap_greedy`): each step takes the feasible vertex nearest the residual point
    (``[x >= 1/2]``, or its top-``budget`` bits) with the largest weight that keeps the rest feasible. Without a
    budget each step halves the residual mass, so at most ``L + 1`` vertices whatever ``D``, and each step fixes a
    coordinate, so never more than the chain; with a budget about ``L + 3`` in practice (every vertex with exactly
    ``budget`` ones where it binds), where the systematic decomposition needs one vertex per distinct level.
  * ``"dyadic"``: round ``mu`` to ``q / 2^L`` and take the binary digit planes of ``q``: plane ``j`` turns on the
    bits whose ``j``-th binary digit is 1 and has weight ``2^-j``, plus one plane ``[mu = 1]`` of weight ``2^-L``;
    identical planes are merged: at most ``L + 1`` vertices, weights exact powers of two. With a budget it only
    applies where every plane has at most ``budget`` ones (exactly ``budget`` when it binds), which is rare.

  Both are used only where their vertices are affinely independent (Cholesky pivots of their Gram matrix
  ``> 1e-3``) and the recomposed marginals are within the precision; other examples fall back to ``"exact"``.
* ``"auto"`` (default): per example the sparser of ``"greedy"`` and ``"exact"``. On float32 ``N(0, s^2)`` scores it
  returns no more vertices than the active-set solver in every regime measured (D = 32 and 128, with and without
  budget, ``s`` = 0.25, 1, 4; ``tests/test_sparsemap_solvers.py``), e.g. ~27 instead of ~60 at D = 128 with budget
  64 and ``s = 1``; at the active set's own precision (float64, ``precision_bits=33``) the active set, which
  re-optimizes every weight, is up to ~2 vertices sparser where ``D = 32`` or the scores are peaked
  (``docs/performance/sparsemap.md``).
* ``"active_set"``: the paper's solver, started from the MAP vertex: a batched primal active-set method (Nocedal &
  Wright 16.4-16.5; Martins et al. AD3, Sec. 6). Each iteration either certifies / adds (MAP oracle on
  ``r = t + 1 - 2 mu``; done when the Frank-Wolfe gap ``max_z <z, r> - <mu, r> <= tol * max(1, max|t|)``, else the
  oracle vertex joins the active set) or steps towards the solution of the equality-constrained KKT system
  ``[[M_S, 1], [1^T, 0]] [xi; tau] = [s_S; 1]`` with the blocking-constraint ratio test. ``M_S^{-1}`` is kept up to
  date by rank-one updates (O(C^2) per iteration, see :func:`lvzoo.estimators.sparsemap_active_set._active_set`);
  on CPU certified examples leave the batch, elsewhere the batch runs in lockstep with a host sync every few
  iterations (``sparsemap_active_set._CHECK_EVERY``). It stops at a ``tol``-certified point after tens to hundreds
  of iterations (marginals typically accurate to ~1e-10; the certificate bounds their error by
  ``sqrt(tol * max(1, max|t|))``); an example whose nearly dependent active set stops rounding from making progress
  even after a fresh inverse stops early, reported unconverged. Its supports are sparse for the same reason as
  ``"greedy"``'s (it only has to hit the marginals to ~1e-10).

``"auto"`` is the default because for the bit-vector VAE each vertex is a decoder row (a 784-pixel likelihood and its
backward), which costs more than the few milliseconds of the greedy. Supports and solver times per decomposition and
regime: ``docs/performance/sparsemap.md``. In float32 every decomposition's weights are rounded to float32 on return,
which moves a marginal by up to ``2^-24`` (each weight's relative rounding, summed over weights that sum to 1): the
returned marginals are within ``1.5 * 2^-24`` for ``"greedy"`` (its ``2^-25`` truncation plus the rounding), ``2^-24``
for ``"exact"`` and the active set, and ``2^-25`` for ``"dyadic"`` (powers of two round exactly).

**Backward.** The exact KKT Jacobian on the final active set, in closed form (O(B D)) for the chain and for
systematic sampling, by one batched dense solve otherwise; see :mod:`lvzoo.estimators.sparsemap_decompositions`.

**Host syncs.** On an accelerator none for ``"exact"`` and ``"dyadic"`` and one every few steps of the greedy
(``sparsemap_active_set._CHECK_EVERY``); they return all slots, active first (:meth:`SparseMAP.distribution` then has
the one inherent ``nonzero``). On CPU, where reading a tensor is free, the slots are trimmed to the largest
support and the batched linear algebra runs only on the examples that need it. All solver and KKT arithmetic runs in
float64; vertices and weights are returned in the scores' dtype. No random numbers are used; the result is
deterministic.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, MarginalizingEstimator, SparseDistribution
from lvzoo.estimators.spaces import BitVector
from lvzoo.estimators.sparsemap_active_set import _WORK_DTYPE, _active_set
from lvzoo.estimators.sparsemap_decompositions import _closed_form, _gather_slots, _KKTWeights
from lvzoo.estimators.validators import int_in, number_in, one_of, optional, positive_int

#: The ways of choosing the SparseMAP distribution (see the module docstring).
DECOMPOSITIONS = ("auto", "greedy", "dyadic", "exact", "active_set")


#: Largest precision of ``"greedy"`` and ``"dyadic"``: dyadic grid points ``q / 2^bits`` stay exact in float64.
MAX_PRECISION_BITS = 52

#: The default precision is the mantissa of the scores' dtype, capped at this (float64: ``2^-41 ~ 4.5e-13``).
DEFAULT_MAX_PRECISION_BITS = 40


@attrs.frozen
class SparseMAPConfig(EstimatorConfig):
    """``decomposition``: one of :data:`DECOMPOSITIONS` (default ``"auto"``: per example the sparser of
    ``"greedy"`` and ``"exact"``); ``precision_bits``: ``L``, the marginals of ``"greedy"`` / ``"dyadic"`` are exact
    to ``2^-(L+1)`` (``None``: the mantissa of the scores' dtype, 24 for float32, capped at
    :data:`DEFAULT_MAX_PRECISION_BITS`; at most :data:`MAX_PRECISION_BITS`); ``max_iter``: iterations of the
    ``"active_set"`` solver (>= 1); ``tol``: its Frank-Wolfe gap tolerance, relative to ``max(1, max|t|)``, in
    (0, 1)."""

    decomposition: str = attrs.field(default="auto", validator=one_of(*DECOMPOSITIONS))
    precision_bits: int | None = attrs.field(default=None, validator=optional(int_in(1, MAX_PRECISION_BITS)))
    max_iter: int = attrs.field(default=1000, validator=positive_int)
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
    """The budget when it constrains ``dim`` bits, else ``None`` (a budget above ``dim`` constrains nothing); the
    rule itself is :class:`BitVector`'s."""
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > dim:
        return None
    return BitVector(dim, budget).binding_budget


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


def solve_sparsemap(
    t: Tensor,
    budget: int | None = None,
    *,
    decomposition: str = "auto",
    precision_bits: int | None = None,
    max_iter: int = 1000,
    tol: float = 1e-9,
) -> SparseMAPSolution:
    """SparseMAP of bit-vector scores ``t [B, D]`` (optionally ``sum(z) <= budget``); see the module docstring.

    ``decomposition`` is one of :data:`DECOMPOSITIONS`; ``precision_bits`` (``"greedy"``, ``"dyadic"``, ``"auto"``)
    defaults to the mantissa bits of ``t``'s dtype, capped at :data:`DEFAULT_MAX_PRECISION_BITS`; ``max_iter`` and
    ``tol`` only apply to ``"active_set"``.
    """
    if t.dim() != 2:
        raise ValueError(f"scores must be [B, D], got shape {tuple(t.shape)}")
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    dim = t.shape[1]
    budget = _effective_budget(budget, dim)
    if precision_bits is None:
        precision_bits = min(1 - int(math.log2(torch.finfo(t.dtype).eps)), DEFAULT_MAX_PRECISION_BITS)
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
                scores, sparsemap_marginals(scores, budget), budget, decomposition, precision_bits
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
            precision_bits=self.config.precision_bits,
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
