"""Top-k sparsemax over bit vectors (Correia et al. 2020, Sec. 4.1).

The ``k`` highest-scoring bit vectors ``z`` of ``s_z = <z, t>`` are found exactly (optionally with at most
``budget`` bits on), then ``q = sparsemax`` over their ``k`` scores and the loss is marginalized over the rows
with ``q > 0``. When fewer than ``k`` rows are kept, ``q`` provably equals sparsemax over all ``2^D`` assignments
(a certificate); otherwise it is the sparse projection ``sparsemax(top_k(s))``.

Ties: the k-best lists are merged with stable sorts in which the "unchanged" candidate (bit not flipped / bit off)
comes first, so equal scores are resolved deterministically. Which of several vectors tied at the k-th score is
returned is therefore fixed but arbitrary; the multiset of returned scores is always exactly the k best.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from entmax import sparsemax
from torch import Tensor

from lvzoo.estimators.base import EstimatorConfig, MarginalizingEstimator, SparseDistribution
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace


def check_k(k: int, dim: int, budget: int | None) -> None:
    """Raise ``ValueError`` unless ``1 <= k <=`` the number of feasible bit vectors of ``BitVector(dim, budget)``."""
    feasible = BitVector(dim, budget).num_assignments()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= feasible:
        raise ValueError(
            f"k={k!r} must be an int in [1, {feasible}]: BitVector(D={dim}, budget={budget}) has only "
            f"{feasible} feasible assignments"
        )


def _keep_best(candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of ``candidates [..., M]`` in decreasing order and their positions, both ``[..., k]``.

    The sort is stable: among equal values the earlier candidate comes first.
    """
    values, positions = torch.sort(candidates, dim=-1, descending=True, stable=True)
    return values[..., :k], positions[..., :k]


def _kbest_unbudgeted(t: Tensor, k: int) -> Tensor:
    """k best bit vectors of ``<z, t>`` without budget, ``t [B, D]`` -> bool ``[B, k, D]`` (best first).

    Every vector is the MAP ``[t > 0]`` with a set of bits flipped, each flip costing ``|t_i|``. The k cheapest
    flip sets only use the ``m = min(k - 1, D)`` cheapest bits, so a sorted-list merge over those ``m`` bits
    (O(k m) work, ``m`` small) keeps the k cheapest flip sets; back-pointers then recover which bits flipped.
    """
    batch, dim = t.shape
    num_flippable = min(k - 1, dim)
    flip_gain, flippable = torch.topk(-t.abs(), num_flippable, dim=-1)  # [B, m] each, cheapest first
    values = torch.cat([t.new_zeros(batch, 1), t.new_full((batch, k - 1), float("-inf"))], dim=-1)
    pointers = []
    for j in range(num_flippable):
        candidates = torch.cat([values, values + flip_gain[:, j : j + 1]], dim=-1)  # [B, 2k]
        values, pointer = _keep_best(candidates, k)
        pointers.append(pointer)
    slot = torch.arange(k, device=t.device).expand(batch, k)
    flipped = torch.zeros(batch, k, num_flippable, dtype=torch.bool, device=t.device)
    for j in reversed(range(num_flippable)):
        came_from = pointers[j].gather(1, slot)
        is_flipped = came_from >= k
        flipped[:, :, j] = is_flipped
        slot = came_from - k * is_flipped.long()
    flips = torch.zeros(batch, k, dim, dtype=torch.bool, device=t.device)
    flips = flips.scatter(2, flippable.unsqueeze(1).expand(batch, k, num_flippable), flipped)
    return (t > 0).unsqueeze(1) ^ flips


def _kbest_budgeted(t: Tensor, k: int, budget: int) -> Tensor:
    """k best bit vectors of ``<z, t>`` with at most ``budget`` ones, ``t [B, D]`` -> bool ``[B, k, D]``.

    DP over the bits keeping, for each count of ones ``c = 0..budget``, the k best partial vectors: the new list
    for ``c`` merges ``c``'s list (bit off) with ``(c-1)``'s list plus ``t_i`` (bit on). O(k D budget) work.
    The answer is the best k over all counts; back-pointers recover the bits.
    """
    batch, dim = t.shape
    counts = budget + 1
    minus_inf = float("-inf")
    values = t.new_full((batch, counts, k), minus_inf)
    values[:, 0, 0] = 0.0
    empty_count = t.new_full((batch, 1, k), minus_inf)
    pointers = []
    for i in range(dim):
        bit_on = torch.cat([empty_count, values[:, :-1]], dim=1) + t[:, i, None, None]  # [B, C, k]
        values, pointer = _keep_best(torch.cat([values, bit_on], dim=-1), k)
        pointers.append(pointer.reshape(batch, counts * k))
    _, final = _keep_best(values.reshape(batch, counts * k), k)  # [B, k], count-major positions
    count, slot = final // k, final % k
    bits = torch.zeros(batch, k, dim, dtype=torch.bool, device=t.device)
    for i in reversed(range(dim)):
        came_from = pointers[i].gather(1, count * k + slot)
        is_on = came_from >= k
        bits[:, :, i] = is_on
        slot = came_from - k * is_on.long()
        count = count - is_on.long()
    return bits


def kbest_bitvectors(t: Tensor, k: int, budget: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact k highest-scoring bit vectors of ``s_z = <z, t>`` for ``t [B, D]``, batched on ``t``'s device.

    Returns ``z [B, k, D]`` (0/1 in ``t``'s dtype, distinct, at most ``budget`` ones) and ``scores [B, k] =
    <z, t>`` in decreasing order (differentiable in ``t`` with ``z`` fixed). Refuses ``k`` larger than the number
    of feasible vectors. See the module docstring for tie-breaking.
    """
    batch, dim = t.shape
    check_k(k, dim, budget)
    with torch.no_grad():
        bits = _kbest_unbudgeted(t, k) if budget is None else _kbest_budgeted(t, k, budget)
    z = bits.to(t.dtype)
    return z, (z * t.unsqueeze(1)).sum(-1)


def topk_sparsemax(t: Tensor, k: int, budget: int | None = None) -> tuple[Tensor, Tensor]:
    """``sparsemax`` over the k best bit vectors of ``t [B, D]``: ``z [B, k, D]`` and ``q [B, k]`` (rows sum to 1)."""
    z, scores = kbest_bitvectors(t, k, budget)
    q: Tensor = sparsemax(scores, dim=-1)
    return z, q


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


@attrs.frozen
class TopKSparsemaxConfig(EstimatorConfig):
    """``k``: number of best bit vectors sparsemax is computed over (the paper uses 10)."""

    k: int = attrs.field(default=10, validator=_positive_int)


class TopKSparsemax(MarginalizingEstimator[TopKSparsemaxConfig]):
    """Exact marginalization under top-k sparsemax for a :class:`BitVector` latent (with or without budget).

    ``logs["support_at_k"]`` is the fraction of examples whose support equals ``k``; the others are certified to
    equal full sparsemax over all feasible assignments.
    """

    config_class = TopKSparsemaxConfig
    supported_spaces: ClassVar[tuple[type[Categorical] | type[BitVector], ...]] = (BitVector,)

    def __init__(
        self, space: LatentSpace, config: TopKSparsemaxConfig | None = None, *, input_dim: int | None = None
    ) -> None:
        super().__init__(space, config, input_dim=input_dim)
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
