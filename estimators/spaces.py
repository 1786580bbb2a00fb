"""Latent spaces. An assignment of any latent space is a dense float row of ``space.size`` entries:
a one-hot row of size K for :class:`Categorical`, a row of D bits for :class:`BitVector`."""

from __future__ import annotations

import itertools
import math

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.validators import positive_int

#: Largest bit-vector dimension that :meth:`BitVector.enumerate` will list (2**20 rows).
MAX_ENUMERABLE_BITS = 20


@attrs.frozen
class Categorical:
    """A single categorical variable with ``K`` classes; assignments are one-hot rows ``[K]``."""

    K: int = attrs.field(validator=positive_int)

    @property
    def size(self) -> int:
        """Width of an assignment row."""
        return self.K

    def enumerate(self) -> Tensor:
        """All assignments, ``[K, K]`` (the identity)."""
        return torch.eye(self.K)


def check_budget(budget: object, dim: int, dim_name: str = "D") -> None:
    """The one budget rule: ``None`` or an int in ``[1, dim]``; otherwise ``ValueError`` naming ``dim_name``."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= dim:
        raise ValueError(f"budget must be None or an int in [1, {dim_name}={dim}], got {budget!r}")


@attrs.frozen
class BitVector:
    """``D`` binary variables, optionally with at most ``budget`` bits on; assignments are rows ``[D]`` of 0/1."""

    D: int = attrs.field(validator=positive_int)
    budget: int | None = attrs.field(default=None)

    @budget.validator
    def _check_budget(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        check_budget(value, self.D)

    @property
    def binding_budget(self) -> int | None:
        """The budget when it constrains the vectors (``budget < D``), else ``None``."""
        return self.budget if self.budget is not None and self.budget < self.D else None

    @property
    def size(self) -> int:
        """Width of an assignment row."""
        return self.D

    def num_assignments(self) -> int:
        """Number of feasible assignments (2**D, or sum_{j<=budget} C(D, j))."""
        if self.budget is None:
            return int(2**self.D)
        return sum(math.comb(self.D, j) for j in range(self.budget + 1))

    def enumerate(self) -> Tensor:
        """All feasible assignments, ``[N, D]`` (refused for D > MAX_ENUMERABLE_BITS)."""
        if self.D > MAX_ENUMERABLE_BITS:
            raise ValueError(
                f"cannot enumerate a BitVector with D={self.D}; at most D={MAX_ENUMERABLE_BITS} is enumerable"
            )
        rows = torch.tensor(list(itertools.product((0.0, 1.0), repeat=self.D)))
        if self.budget is not None:
            rows = rows[rows.sum(-1) <= self.budget]
        return rows


LatentSpace = Categorical | BitVector
