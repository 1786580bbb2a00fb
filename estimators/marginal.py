"""Exact marginalization over a categorical latent: softmax (dense), sparsemax and 1.5-entmax (sparse).

A normalizer maps the scores ``[B, K]`` to probabilities ``[B, K]``; the downstream loss is then evaluated once,
on the (example, category) rows with nonzero probability only, and weighted by those probabilities
(:func:`lvzoo.estimators.base.marginalize`). The result is the exact expected loss and its exact gradient.
Softmax is the dense baseline: it evaluates all ``K`` rows of every example.
"""

from __future__ import annotations

import abc
from typing import ClassVar, TypeVar

import attrs
import torch
from entmax import entmax15, sparsemax
from torch import Tensor

from lvzoo.estimators.base import (
    EstimatorConfig,
    MarginalizingEstimator,
    SparseDistribution,
    dense_to_sparse,
)
from lvzoo.estimators.spaces import BitVector, Categorical


@attrs.frozen
class SoftmaxConfig(EstimatorConfig):
    """Dense softmax marginalization has no hyper-parameters."""


@attrs.frozen
class SparsemaxConfig(EstimatorConfig):
    """Sparsemax marginalization has no hyper-parameters."""


@attrs.frozen
class Entmax15Config(EstimatorConfig):
    """1.5-entmax marginalization has no hyper-parameters."""


MC = TypeVar("MC", bound=EstimatorConfig)


def all_rows(probs: Tensor, space: Categorical) -> SparseDistribution:
    """Every (example, category) pair of ``probs [B, K]`` as a distribution with ``B * K`` rows."""
    batch, num_classes = probs.shape
    eye = torch.eye(space.K, dtype=probs.dtype, device=probs.device)
    return SparseDistribution(
        z_rows=eye.repeat(batch, 1),
        example_index=torch.arange(batch, device=probs.device).repeat_interleave(num_classes),
        probs=probs.reshape(-1),
        num_examples=batch,
        categories=torch.arange(num_classes, device=probs.device).repeat(batch),
    )


class MarginalEstimator(MarginalizingEstimator[MC], abc.ABC):
    """Shared exact marginalization: ``normalize(scores)`` then one loss call on the kept rows.

    Subclasses implement :meth:`normalize`; ``dense = True`` keeps every row even where a probability
    underflows to zero (the softmax baseline), otherwise only the nonzero rows are evaluated.
    """

    supported_spaces: ClassVar[tuple[type[Categorical | BitVector], ...]] = (Categorical,)
    dense: ClassVar[bool] = False

    @abc.abstractmethod
    def normalize(self, scores: Tensor) -> Tensor:
        """Probabilities ``[B, K]`` (rows on the simplex) from scores ``[B, K]``."""

    def distribution(self, scores: Tensor) -> SparseDistribution:
        """The rows of ``normalize(scores [B, K])`` that are evaluated (all K for the dense baseline)."""
        assert isinstance(self.space, Categorical)
        probs = self.normalize(scores)
        return all_rows(probs, self.space) if self.dense else dense_to_sparse(probs, self.space)


class SoftmaxMarginal(MarginalEstimator[SoftmaxConfig]):
    """Dense marginalization under ``softmax(scores)``: ``K`` loss rows per example."""

    config_class = SoftmaxConfig
    dense = True

    def normalize(self, scores: Tensor) -> Tensor:
        """``softmax(scores)``, ``[B, K]``."""
        return torch.softmax(scores, dim=-1)


class SparsemaxMarginal(MarginalEstimator[SparsemaxConfig]):
    """Sparse marginalization under ``sparsemax(scores)``: only the support is evaluated."""

    config_class = SparsemaxConfig

    def normalize(self, scores: Tensor) -> Tensor:
        """``sparsemax(scores)`` (Euclidean projection onto the simplex), ``[B, K]``."""
        probs: Tensor = sparsemax(scores, dim=-1)
        return probs


class Entmax15Marginal(MarginalEstimator[Entmax15Config]):
    """Sparse marginalization under ``entmax15(scores)``: only the support is evaluated."""

    config_class = Entmax15Config

    def normalize(self, scores: Tensor) -> Tensor:
        """``1.5-entmax(scores)``, ``[B, K]``."""
        probs: Tensor = entmax15(scores, dim=-1)
        return probs


__all__ = [
    "Entmax15Config",
    "Entmax15Marginal",
    "MarginalEstimator",
    "SoftmaxConfig",
    "SoftmaxMarginal",
    "SparsemaxConfig",
    "SparsemaxMarginal",
    "all_rows",
]
