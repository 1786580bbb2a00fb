"""Top-k sparsemax over bit vectors (Correia et al. 2020, Sec. 4.1).

The ``k`` highest-scoring bit vectors ``z`` of ``s_z = <z, t>`` are found exactly (optionally with at most
``budget`` bits on), then ``q = sparsemax`` over their ``k`` scores and the loss is marginalized over the rows
with ``q > 0``. When fewer than ``k`` rows are kept, ``q`` provably equals sparsemax over all ``2^D`` assignments
(a certificate); otherwise it is the sparse projection ``sparsemax(top_k(s))``.

**Search without budget.** Every vector is the MAP ``[t > 0]`` with a set of bits flipped, each flip costing
``|t_i|``. Only the ``m = min(k - 1, D)`` cheapest bits can be flipped in the k best, and a flip set ``F`` (positions
among those ``m``, cheapest first) can only be among the k cheapest if fewer than ``k`` flip sets *precede* it
(``G`` precedes ``F`` when ``|G| <= |F|`` and the ``j``-th largest position of ``G`` is at most that of ``F`` for
every ``j``; then ``cost(G) <= cost(F)``). The preceding sets form a down-closed family of at most a few dozen sets
(17 for ``k = 10``), built once per ``(k, m)`` on the host; the search is then one ``[B, m] @ [m, P]`` product and
one sort (no loop over bits).

**Search with budget.** Sort the bits by decreasing ``t`` and call an off bit that precedes an on bit a *hole*. If
some on bit ``l`` of ``z`` has ``k`` holes ``j`` before it, the ``k`` swaps ``z + e_j - e_l`` are distinct, feasible
and score at least ``s_z``; by induction on the sum of on-bit ranks, at least ``k`` vectors without that pattern
score at least ``s_z``, so the k best scores are attained by vectors whose on bits all have fewer than ``k`` holes
before them. In particular only the ``budget + k - 1`` largest bits can be on. The dynamic program runs over those
bits keeping, per number of holes ``h = 0..k-1`` (plus one *closed* state, ``h >= k``, in which no bit may turn on),
the k best partial vectors; back-pointers recover the bits. O(k^2 (budget + k)) work instead of O(k D budget).

Ties: all sorts are stable, so equal scores are resolved deterministically. Which of several vectors tied at the
k-th score is returned is therefore fixed but arbitrary; the multiset of returned scores is always exactly the k
best.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import attrs
import torch
from entmax import sparsemax
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, MarginalizingEstimator, SparseDistribution
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from lvzoo.estimators.validators import positive_int

#: With a budget, shapes are enumerated while ``k`` has at most this many partitions of ``0..k-1`` (``k <= 22``);
#: larger ``k`` use the hole dynamic program.
MAX_SHAPES = 4096


def check_k(k: int, dim: int, budget: int | None) -> None:
    """Raise ``ValueError`` unless ``1 <= k <=`` the number of feasible bit vectors of ``BitVector(dim, budget)``."""
    feasible = BitVector(dim, budget).num_assignments()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= feasible:
        raise ValueError(
            f"k={k!r} must be an int in [1, {feasible}]: BitVector(D={dim}, budget={budget}) has only "
            f"{feasible} feasible assignments"
        )


def _count_preceding(positions: tuple[int, ...]) -> int:
    """Number of flip sets ``G != F`` that precede ``F = positions`` (ascending, 0-based); see the module docstring.

    For each size ``q <= |F|``, counts increasing sequences ``g_1 < ... < g_q`` with ``g_i <= f_{|F| - q + i}``.
    """
    total = 0
    for size in range(len(positions) + 1):
        ending_at = [1]  # size 0: the empty sequence, treated as ending below every value
        for step, bound in enumerate(positions[len(positions) - size :]):
            if step == 0:
                ending_at = [1] * (bound + 1)
                continue
            extended, below = [], 0
            for value in range(bound + 1):
                extended.append(below)  # sequences ending at a smaller value, extended by this one
                below += ending_at[value] if value < len(ending_at) else 0
            ending_at = extended
        total += sum(ending_at)
    return total - 1


@functools.lru_cache(maxsize=64)
def _flip_set_table(k: int, num_flippable: int) -> Tensor:
    """Bool ``[P, m]``: every flip set over ``m`` positions with fewer than ``k`` preceding sets (down-closed)."""
    kept: list[tuple[int, ...]] = []
    stack: list[tuple[int, ...]] = [()]
    while stack:
        flip_set = stack.pop()
        kept.append(flip_set)
        start = flip_set[-1] + 1 if flip_set else 0
        for position in range(start, num_flippable):
            extended = (*flip_set, position)
            if _count_preceding(extended) >= k:
                break  # a larger last position is preceded by even more sets
            stack.append(extended)
    kept.sort(key=lambda flip_set: (len(flip_set), flip_set))
    table = torch.zeros(len(kept), num_flippable, dtype=torch.bool)
    for row, flip_set in enumerate(kept):
        table[row, list(flip_set)] = True
    return table


def _kbest_unbudgeted(t: Tensor, k: int) -> Tensor:
    """k best bit vectors of ``<z, t>`` without budget, ``t [B, D]`` -> bool ``[B, k, D]`` (best first).

    The MAP with the k cheapest flip sets among the candidate table (see the module docstring).
    """
    batch, dim = t.shape
    num_flippable = min(k - 1, dim)
    if num_flippable == 0:
        return (t > 0).unsqueeze(1)
    table = _flip_set_table(k, num_flippable).to(t.device)  # [P, m], sorted by size
    flip_cost, flippable = torch.topk(-t.abs(), num_flippable, dim=-1)  # [B, m], cheapest first (negated)
    costs = -(flip_cost @ table.T.to(t.dtype))  # [B, P]
    chosen = torch.topk(costs, k, dim=-1, largest=False).indices  # [B, k], cheapest first
    flipped = table[chosen]  # [B, k, m]
    flips = torch.zeros(batch, k, dim, dtype=torch.bool, device=t.device)
    flips = flips.scatter(2, flippable.unsqueeze(1).expand(batch, k, num_flippable), flipped)
    return (t > 0).unsqueeze(1) ^ flips


@functools.lru_cache(maxsize=64)
def _partition_table(k: int) -> Tensor:
    """Long ``[P, k - 1]``: every partition of ``0..k-1`` as non-increasing parts padded with zeros."""
    partitions: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], remaining: int, largest: int) -> None:
        partitions.append(prefix)
        for part in range(min(remaining, largest), 0, -1):
            extend((*prefix, part), remaining - part, part)

    extend((), k - 1, k - 1)
    table = torch.zeros(len(partitions), max(k - 1, 1), dtype=torch.int64)
    for row, parts in enumerate(partitions):
        table[row, : len(parts)] = torch.tensor(parts, dtype=torch.int64)
    return table


@functools.lru_cache(maxsize=64)
def _shape_tables(k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constant tables of the shape enumeration for counts ``m + o``, ``o = -w..w``, and the partitions ``lam``.

    Returns ``offset [W * P]`` (``o``), ``parts [W * P, k - 1]`` (``lam``), ``base [W * P]`` (``o - #parts``, the
    unshifted prefix length relative to ``m``) and ``incidence [O, W * P]``: how many shifted ones land at
    ``m + first + row`` with ``first = -w - (k - 1)`` (each part ``lam_j > 0`` lands at ``m + o - j + lam_j``).
    """
    window = _count_window(k)
    partitions = _partition_table(k)
    num, width = partitions.shape
    offset = torch.arange(-window, window + 1).repeat_interleave(num)  # [W * P]
    parts = partitions.repeat(2 * window + 1, 1)
    base = offset - (parts > 0).sum(-1)
    first = -window - width
    landing = offset.unsqueeze(-1) - torch.arange(1, width + 1) + parts - first  # [W * P, k - 1]
    rows = 2 * (window + width)
    incidence = torch.zeros(rows + 1, offset.shape[0])
    incidence.scatter_add_(0, torch.where(parts > 0, landing, rows).T, torch.ones(width, offset.shape[0]))
    return offset, parts, base, incidence[:rows]


def _kbest_budgeted_shapes(t: Tensor, k: int, budget: int) -> Tensor:
    """k best vectors with at most ``budget`` ones by enumerating shapes, ``t [B, D]`` -> bool ``[B, k, D]``.

    With the bits sorted decreasingly, a vector with ``c`` ones whose ``i``-th one has ``d_i`` holes before it is
    the top-``c`` set with its last ones shifted right by the partition ``d`` of its number of (hole, later one)
    pairs. The candidates are all partitions of ``0..k-1`` and the counts ``c`` within ``w`` of the MAP count ``m``
    (module docstring); their scores are ``prefix[c - #parts]`` plus one ``[B, O] @ [O, W P]`` product of a window of
    the sorted scores around ``m`` with the constant landing table.
    """
    batch, dim = t.shape
    offset, parts, base, incidence = (table.to(t.device) for table in _shape_tables(k))
    sorted_t, order = torch.sort(t, dim=-1, descending=True, stable=True)
    prefix = torch.cat([t.new_zeros(batch, 1), sorted_t.cumsum(-1)], dim=-1)  # [B, D + 1]
    map_count = (t > 0).sum(-1, keepdim=True).clamp(max=budget)  # [B, 1]
    first = -_count_window(k) - parts.shape[1]
    positions = map_count + first + torch.arange(incidence.shape[0], device=t.device)  # [B, O]
    window = sorted_t.gather(1, positions.clamp(0, dim - 1)) * ((positions >= 0) & (positions < dim))
    count = map_count + offset  # [B, W * P]
    unshifted = map_count + base
    scores = prefix.gather(1, unshifted.clamp(0, dim)) + window @ incidence.to(t.dtype)
    feasible = (unshifted >= 0) & (count <= budget) & (count - 1 + parts[:, 0] < dim)
    scores = torch.where(feasible, scores, float("-inf"))
    chosen = torch.topk(scores, k, dim=-1).indices  # [B, k], best first
    count, shape, unshifted = count.gather(1, chosen), parts[chosen], unshifted.gather(1, chosen)
    landing = count.unsqueeze(-1) - torch.arange(1, parts.shape[1] + 1, device=t.device) + shape
    landing = torch.where(shape > 0, landing, dim)  # unused parts land in a dropped extra column
    bits = torch.arange(dim + 1, device=t.device) < unshifted.unsqueeze(-1)  # [B, k, D + 1]
    bits = bits.scatter(2, landing, True)[..., :dim]
    out = torch.zeros(batch, k, dim, dtype=torch.bool, device=t.device)
    return out.scatter(2, order.unsqueeze(1).expand(batch, k, dim), bits)


def _count_window(k: int) -> int:
    """The smallest ``w`` with ``2^(w+1) - 1 >= k``: the k best have ``m - w .. m + w`` ones (``m``: MAP count)."""
    return k.bit_length() - 1


def _kbest_budgeted(t: Tensor, k: int, budget: int) -> Tensor:
    """k best bit vectors of ``<z, t>`` with at most ``budget`` ones, ``t [B, D]`` -> bool ``[B, k, D]``.

    The hole dynamic program of the module docstring over the ``n = min(D, budget + k - 1)`` largest bits (sorted
    decreasingly, stable). State ``h < k``: ``h`` holes so far (then ``i - h`` bits on after ``i`` bits); state
    ``k``: closed. Each step merges, per state, "bit on" (or "stay closed") with "bit off from ``h - 1``".
    """
    batch, dim = t.shape
    length = min(dim, budget + k - 1)
    order = torch.sort(t, dim=-1, descending=True, stable=True).indices[:, :length]
    ranked = t.gather(-1, order)  # [B, n]
    num_states = k + 1
    holes = torch.arange(num_states, device=t.device)
    steps = torch.arange(length, device=t.device)
    closed = holes == k
    may_turn_on = ~closed & (steps.unsqueeze(1) - holes + 1 <= budget)  # [n, k + 1]
    minus_inf = torch.tensor(float("-inf"), dtype=t.dtype, device=t.device)
    # per step and state: the gain of the first candidate list ("bit on", or 0 for "stay closed")
    gains = torch.where(may_turn_on, ranked.unsqueeze(-1), torch.where(closed, 0.0, minus_inf))  # [B, n, k + 1]
    values = t.new_full((batch, num_states, k), float("-inf"))
    values[:, 0, 0] = 0.0
    candidates = t.new_full((batch, num_states, 2 * k), float("-inf"))
    pointers = []
    for i in range(length):
        candidates[:, :, :k] = values + gains[:, i].unsqueeze(-1)
        candidates[:, 1:, k:] = values[:, :-1]
        sorted_values, pointer = torch.sort(candidates, dim=-1, descending=True, stable=True)
        values = sorted_values[..., :k]
        pointers.append(pointer[..., :k].reshape(batch, num_states * k))
    final = torch.sort(values.reshape(batch, num_states * k), dim=-1, descending=True, stable=True).indices[:, :k]
    state, slot = final // k, final % k
    bits = torch.zeros(batch, k, length, dtype=torch.bool, device=t.device)
    for i in reversed(range(length)):
        came_from = pointers[i].gather(1, state * k + slot)
        turned_off = came_from >= k
        bits[:, :, i] = ~turned_off & (state < k)
        slot = came_from - k * turned_off.long()
        state = state - turned_off.long()
    out = torch.zeros(batch, k, dim, dtype=torch.bool, device=t.device)
    return out.scatter(2, order.unsqueeze(1).expand(batch, k, length), bits)


def kbest_bitvectors(t: Tensor, k: int, budget: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact k highest-scoring bit vectors of ``s_z = <z, t>`` for ``t [B, D]``, batched on ``t``'s device.

    Returns ``z [B, k, D]`` (0/1 in ``t``'s dtype, distinct, at most ``budget`` ones) and ``scores [B, k] =
    <z, t>`` in decreasing order (differentiable in ``t`` with ``z`` fixed). Refuses ``k`` larger than the number
    of feasible vectors. See the module docstring for the algorithms and tie-breaking.
    """
    _batch, dim = t.shape
    check_k(k, dim, budget)
    with torch.no_grad():
        if budget is None or budget >= dim:
            bits = _kbest_unbudgeted(t, k)
        elif _partition_table(k).shape[0] <= MAX_SHAPES:
            bits = _kbest_budgeted_shapes(t, k, budget)
        else:
            bits = _kbest_budgeted(t, k, budget)
    z = bits.to(t.dtype)
    return z, (z * t.unsqueeze(1)).sum(-1)


def topk_sparsemax(t: Tensor, k: int, budget: int | None = None) -> tuple[Tensor, Tensor]:
    """``sparsemax`` over the k best bit vectors of ``t [B, D]``: ``z [B, k, D]`` and ``q [B, k]`` (rows sum to 1)."""
    z, scores = kbest_bitvectors(t, k, budget)
    q: Tensor = sparsemax(scores, dim=-1)
    return z, q


@attrs.frozen
class TopKSparsemaxConfig(EstimatorConfig):
    """``k``: number of best bit vectors sparsemax is computed over (the paper uses 10)."""

    k: int = attrs.field(default=10, validator=positive_int)


class TopKSparsemax(MarginalizingEstimator[TopKSparsemaxConfig]):
    """Exact marginalization under top-k sparsemax for a :class:`BitVector` latent (with or without budget).

    ``logs["support_at_k"]`` is the fraction of examples whose support equals ``k``; the others are certified to
    equal full sparsemax over all feasible assignments.
    """

    config_class = TopKSparsemaxConfig
    supported_spaces: ClassVar[tuple[type[Categorical | BitVector], ...]] = (BitVector,)

    def __init__(
        self, space: LatentSpace, config: TopKSparsemaxConfig | None = None
    ) -> None:
        super().__init__(space, config)
        assert isinstance(space, BitVector)  # the base class refused any other space
        check_k(self.config.k, space.D, space.budget)
        self.bit_space: BitVector = space

    def distribution(self, scores: Tensor) -> SparseDistribution:
        """The nonzero rows of ``topk_sparsemax(scores)`` for scores ``t [B, D]``."""
        z, q = topk_sparsemax(scores, self.config.k, self.bit_space.budget)
        example_index, slot = torch.nonzero(q > 0, as_tuple=True)
        return SparseDistribution(
            z_rows=z[example_index, slot],
            example_index=example_index,
            probs=q[example_index, slot],
            num_examples=scores.shape[0],
            logs={"support_at_k": ((q > 0).sum(-1) == self.config.k).to(scores.dtype).mean()},
        )


__all__ = [
    "TopKSparsemax",
    "TopKSparsemaxConfig",
    "check_k",
    "kbest_bitvectors",
    "topk_sparsemax",
]
