"""The batched KKT linear algebra of SparseMAP and its active-set solver (``decomposition="active_set"``).

Shapes: float64 scores ``[B, D]``; vertex sets are 0/1 (or bool) ``vertices [B, C, D]`` with ``active [B, C]``
slots, their Gram matrices ``M_S`` ``[B, C, C]``, and weights / KKT directions ``[B, C]``. :func:`_active_set`
works on the batch at once (:class:`_Working`: compacted on CPU, in lockstep elsewhere). The method and its
stopping rule are described in :mod:`lvzoo.estimators.sparsemap`; the dense backward :func:`_dense_kkt_direction`
also serves the dyadic and greedy decompositions (:mod:`lvzoo.estimators.sparsemap_decompositions`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: After the first iteration, convergence (a host sync) is checked every this many iterations off CPU (the greedy
#: decomposition uses the same cadence for its steps).
_CHECK_EVERY = 4

#: The active-set solver recomputes its inverse Gram matrix from scratch every this many iterations.
_REFRESH_EVERY = 64

#: When compacting, the slot window grows by this many slots at a time.
_GROW_BY = 8

#: All solver and KKT arithmetic runs in this dtype.
_WORK_DTYPE = torch.float64


def _map_oracle(r: Tensor, budget: int | None, tie: Tensor | float = 0.0) -> Tensor:
    """Highest-scoring feasible vertex ``argmax_z <z, r>``, ``r [B, D]`` -> 0/1 ``[B, D]``.

    Bits with ``r_i <= tie`` (``[B, 1]`` or a float) stay off, so that entries equal to zero up to rounding are
    resolved the same way under tiny perturbations of the scores.
    """
    if budget is None:
        return (r > tie).to(r.dtype)
    top_values, top_index = r.topk(budget, dim=-1, sorted=False)
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


def _dense_kkt_direction(vertices: Tensor, active: Tensor, grad_weights: Tensor) -> Tensor:
    """``(S - s s^T / sigma) g`` ``[B, C]`` with ``S = M_S^{-1}``, ``s = S 1``, ``sigma = 1^T s``: one batched solve
    of ``M_S`` with the two right-hand sides ``g`` and ``1`` (the KKT matrix's top-left inverse block)."""
    on = active.to(_WORK_DTYPE)
    rhs = torch.stack([grad_weights * on, on], dim=-1)  # [B, C, 2]
    solved: tuple[Tensor, Tensor] = torch.linalg.solve_ex(_gram(vertices, active), rhs, check_errors=False)
    inverse_g, inverse_ones = solved[0].unbind(-1)
    sigma = inverse_ones.sum(-1, keepdim=True).clamp_min(torch.finfo(on.dtype).tiny)
    return (inverse_g - inverse_ones * (inverse_ones * grad_weights).sum(-1, keepdim=True) / sigma) * on


class _Working:
    """The active-set state of the examples still being solved, ``b`` of them with a window of ``w`` slots.

    ``rows [b]`` (their batch indices), 0/1 ``vertices [b, w, D]``, ``weights [b, w]``, ``on [b, w]`` (1.0 on
    active slots), per slot ``linear`` (``<z, t>``) and ``sizes`` (``|z|``) ``[b, w]`` (free slots hold stale
    values, which ``on`` and the zero rows of the inverse mask), ``inverse [b, w, w]`` (``M_S^{-1}``, zero outside
    the active slots), ``stationary [b]`` (weights optimal on the active set), ``done [b]`` (certified; always false
    when compacting, as certified examples leave), and the per-example certificate ``threshold [b]`` and oracle
    ``tie [b, 1]``. All contiguous, so that the batched products run as single kernels; few operations per
    iteration, as the loop is bound by their overhead.
    """

    _PER_EXAMPLE: tuple[str, ...] = ("rows", "scores", "threshold", "tie", "vertices", "weights", "on", "linear")
    _PER_EXAMPLE += ("sizes", "inverse", "stationary", "done", "added", "added_slot", "retried", "stalled")

    def __init__(self, scores: Tensor, first: Tensor, width: int, tol: float, compact: bool) -> None:
        batch, dim = scores.shape
        self.rows = torch.arange(batch, device=scores.device)
        self.compact = compact
        self.scores = scores
        magnitude = scores.abs().amax(-1).clamp_min(1)
        self.threshold = tol * magnitude
        self.tie = (16 * dim * torch.finfo(scores.dtype).eps * magnitude).unsqueeze(-1)
        self.vertices = scores.new_zeros(batch, width, dim)
        self.vertices[:, 0] = first
        self.weights = scores.new_zeros(batch, width)
        self.weights[:, 0] = 1
        self.on = self.weights.clone()
        self.linear = torch.zeros_like(self.weights)
        self.linear[:, 0] = (first * scores).sum(-1)
        self.sizes = torch.zeros_like(self.weights)
        self.sizes[:, 0] = first.sum(-1)
        self.inverse = scores.new_zeros(batch, width, width)
        self.inverse[:, 0, 0] = 1.0 / dim  # M_zz = D
        self.stationary = torch.ones(batch, dtype=torch.bool, device=scores.device)
        self.done = torch.zeros_like(self.stationary)
        self.added, self.added_slot = torch.zeros_like(self.stationary), torch.zeros_like(self.rows).unsqueeze(-1)
        self.retried, self.stalled = torch.zeros_like(self.stationary), torch.zeros_like(self.stationary)
        self.refresh_wanted = torch.zeros((), dtype=torch.bool, device=scores.device)

    def stall(self, stuck: Tensor) -> None:
        """The examples with ``stuck [b]`` cannot progress as the (rounded) inverse says they should: a new vertex
        whose KKT weight is not positive, or an uncertified stationary point on all ``D + 1`` slots. Both are
        impossible in exact arithmetic, so the inverse is refreshed; an example stuck again right after a refresh
        is ``stalled`` (it stops, unconverged)."""
        self.stalled = self.stalled | (stuck & self.retried)
        self.retried = self.retried | stuck
        self.refresh_wanted = self.refresh_wanted | stuck.any()

    def keep(self, mask: Tensor) -> None:
        """Keep only the examples with ``mask [b]`` (CPU: the finished ones have been written out)."""
        for name in self._PER_EXAMPLE:
            setattr(self, name, getattr(self, name)[mask])

    def grow(self, slots: int) -> None:
        """``slots`` more (free) slots."""
        pad = torch.nn.functional.pad
        self.vertices = pad(self.vertices, (0, 0, 0, slots))
        self.inverse = pad(self.inverse, (0, slots, 0, slots))
        self.weights, self.on, self.linear, self.sizes = (
            pad(x, (0, slots)) for x in (self.weights, self.on, self.linear, self.sizes)
        )

    def add(self, add: Tensor, candidate: Tensor) -> None:
        """Put ``candidate [b, D]`` into the first free slot of the examples with ``add [b]`` (weight 0), updating
        the inverse by the bordered-matrix formula."""
        dim = candidate.shape[1]
        free_slot = self.on.argmin(-1, keepdim=True)  # the first free slot: the window always has one
        self.added, self.added_slot = add, free_slot
        adding = add.to(self.on.dtype).unsqueeze(-1)
        placed = torch.zeros_like(self.on).scatter_(1, free_slot, adding)
        size = candidate.sum(-1, keepdim=True)
        overlaps = torch.bmm(candidate.unsqueeze(1), self.vertices.transpose(1, 2)).squeeze(1)  # row form: faster
        cross = (2 * overlaps - self.sizes - size + dim) * self.on  # M_{S, v}
        h = torch.bmm(cross.unsqueeze(1), self.inverse).squeeze(1)  # H is symmetric
        schur = (dim - torch.linalg.vecdot(cross, h).unsqueeze(-1)).clamp_min(torch.finfo(h.dtype).tiny)
        direction = h - placed
        self.inverse.baddbmm_((direction * (adding / schur)).unsqueeze(2), direction.unsqueeze(1))
        self.vertices = torch.lerp(self.vertices, candidate.unsqueeze(1), placed.unsqueeze(-1))
        self.linear = torch.lerp(self.linear, torch.linalg.vecdot(candidate, self.scores).unsqueeze(-1), placed)
        self.sizes = torch.lerp(self.sizes, size, placed)
        self.on += placed

    def step(self) -> None:
        """For the examples not done: step from the weights towards the KKT point of the active set, as far as the
        weights stay nonnegative (then ``stationary``); a blocking vertex leaves the active set (inverse
        downdated, its slot freed)."""
        solved = torch.bmm(torch.stack([self.linear, self.on], dim=1), self.inverse)  # [H s_S, H 1]: 0 off S
        p, q = solved.unbind(1)
        sums = solved.sum(-1)
        target = torch.addcmul(p, (1 - sums[:, :1]) / sums[:, 1:], q)  # 1^T H 1 > 0: H is positive definite
        rejected = self.added & (target.gather(1, self.added_slot).squeeze(1) <= 0)
        self.stall(rejected)
        self.retried = self.retried & ~(self.added & ~rejected)  # a vertex that joined: progress
        self.added = torch.zeros_like(self.added)
        current = self.weights
        ratios = torch.where(target < 0, current / (current - target), 2.0)
        step, blocker = ratios.min(-1, keepdim=True)
        moved = torch.lerp(current, target, step.clamp(max=1)).clamp_min_(0)
        full = (step >= 1).squeeze(-1)
        if self.compact:
            self.weights, self.stationary, dropping = moved, full, ~full
            if not bool(dropping.any()):
                return
        else:
            self.weights = torch.where(self.done.unsqueeze(-1), current, moved)
            self.stationary = full | self.done
            dropping = ~self.stationary
        leaving = dropping.to(self.on.dtype).unsqueeze(-1)
        column = self.inverse.gather(1, blocker.unsqueeze(-1).expand(-1, 1, self.on.shape[1])).squeeze(1)
        pivot = torch.where(dropping.unsqueeze(-1), column.gather(1, blocker), 1.0)
        self.inverse.baddbmm_((column * (-leaving / pivot)).unsqueeze(2), column.unsqueeze(1))
        kept = 1 - torch.zeros_like(self.on).scatter_(1, blocker, leaving)
        self.inverse *= kept.unsqueeze(2) * kept.unsqueeze(1)
        self.weights = self.weights * kept
        self.on = self.on * kept

    def refresh(self) -> None:
        """Recompute the inverse from scratch (removes the rounding drift of the rank-one updates)."""
        on = self.on
        fresh = torch.linalg.inv_ex(_gram(self.vertices, on > 0))[0]
        self.inverse = (fresh + fresh.transpose(1, 2)) * (on.unsqueeze(2) * on.unsqueeze(1) / 2)  # kept symmetric
        self.refresh_wanted = torch.zeros_like(self.refresh_wanted)


def _active_set(
    scores: Tensor, budget: int | None, max_iter: int, tol: float, *, compact: bool | None = None
) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
    """The paper's primal active-set solver from the MAP vertex (see :mod:`lvzoo.estimators.sparsemap`), on float64
    ``scores [B, D]``: ``(vertices [B, C, D], weights [B, C], active, iterations, converged [B])`` with ``C <= D + 1``.

    The inverse ``H = M_S^{-1}`` of the active Gram matrix (zero outside the active slots) is kept up to date by
    rank-one updates, O(C^2) per example and iteration instead of a fresh O(C^3) solve: adding vertex ``v`` in slot
    ``j`` with ``m = M_{S, v}``, ``h = H m`` and Schur complement ``sigma = D - m^T h`` is ``H += g g^T / sigma``
    with ``g = h - e_j``; dropping slot ``j`` is ``H -= H_j H_j^T / H_jj``. The KKT point on the active set is then
    ``p + tau q`` with ``p = H s_S``, ``q = H 1`` and ``tau = (1 - 1^T p) / 1^T q``; ``H`` is recomputed from
    scratch every :data:`_REFRESH_EVERY` iterations. With ``compact`` (default: on CPU, where a host check is free)
    finished examples leave the working set and the slot window grows with the largest support; otherwise all
    ``D + 1`` slots are used in lockstep and convergence is checked every :data:`_CHECK_EVERY` iterations.
    """
    batch, dim = scores.shape
    capacity = dim + 1
    compact = scores.device.type == "cpu" if compact is None else compact
    work = _Working(scores, _map_oracle(scores, budget), 2 if compact else capacity, tol, compact)
    out_vertices = scores.new_zeros(batch, capacity, dim)
    out_weights = scores.new_zeros(batch, capacity)
    done = torch.zeros(batch, dtype=torch.bool, device=scores.device)
    iterations = 0
    for iteration in range(max_iter):
        iterations = iteration + 1
        checking = compact or iteration == 0 or iterations % _CHECK_EVERY == 0  # host syncs allowed now
        if iterations % _REFRESH_EVERY == 0 or (checking and bool(work.refresh_wanted)):
            work.refresh()
        if compact and not bool(work.stationary.any()):
            work.step()  # every example is still dropping blocked vertices: nothing to certify
            continue
        # certificate / add, for examples whose weights are optimal on their active set
        mu = torch.bmm(work.weights.unsqueeze(1), work.vertices).squeeze(1)
        residual = work.scores + 1 - 2 * mu
        candidate = _map_oracle(residual, budget, work.tie)
        certified = ((candidate - mu) * residual).sum(-1) <= work.threshold
        if work.on.shape[1] == capacity:  # an uncertified stationary point on all D + 1 slots
            stuck = work.stationary & ~certified & (work.on.sum(-1) == capacity) & ~work.done
            work.stall(stuck)
            work.stationary = work.stationary & ~stuck
        if compact:
            finished = (work.stationary & certified) | work.stalled
            if bool(finished.any()):
                _write_out(work, finished, out_vertices, out_weights)
                done[work.rows[finished & ~work.stalled]] = True
                work.keep(~finished)
                if work.rows.numel() == 0:
                    break
                candidate = candidate[~finished]
            if bool(work.stationary.any()):
                if work.on.shape[1] < capacity and bool((work.on[:, -1] > 0).any()):
                    work.grow(min(_GROW_BY, capacity - work.on.shape[1]))  # keep a free slot in the window
                work.add(work.stationary, candidate)
        else:
            work.done = work.done | (work.stationary & certified) | work.stalled
            if checking and bool(work.done.all()):
                break
            work.add(work.stationary & ~work.done, candidate)
        work.step()
    if not compact:
        done = work.done & ~work.stalled
    if work.rows.numel() > 0:
        _write_out(work, torch.ones_like(work.stationary), out_vertices, out_weights)
    return out_vertices, out_weights, out_weights > 0, iterations, done


def _write_out(work: _Working, mask: Tensor, vertices: Tensor, weights: Tensor) -> None:
    """Copy the solutions of the working examples with ``mask [b]`` into ``vertices [B, D + 1, D]`` and
    ``weights [B, D + 1]`` (the first ``w`` slots)."""
    rows, width = work.rows[mask], work.on.shape[1]
    vertices[rows, :width] = work.vertices[mask]
    weights[rows, :width] = work.weights[mask] * work.on[mask]
