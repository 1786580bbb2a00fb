"""The estimator protocol: scores in, a typed :class:`EstimatorResult` out.

Shapes: ``B`` examples, latent rows of width ``N = space.size`` (K for categorical, D for bit vectors),
``R`` decoder rows evaluated in one step.

The downstream loss is a ``LossFn``: ``loss_fn(z_rows [R, N], example_index [R]) -> loss [R]``. Every estimator
calls it **once per step** with all the (example, assignment) rows it needs and segment-sums the weighted results
back to the ``B`` examples.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace


class LossFn(Protocol):
    """Per-row downstream loss: ``(z_rows [R, N], example_index [R] long) -> loss [R]``.

    A loss may also implement ``of_categories(categories [R] long, example_index [R]) -> loss [R]``, the same
    values and parameter gradients for the constant one-hot rows ``one_hot(categories)``;
    :func:`evaluate_rows` then calls it instead (e.g. the signalling game gathers rows from all
    symbol-candidate logits, computed once per batch, instead of embedding ``[R, K]`` one-hot rows).
    """

    def __call__(self, z_rows: Tensor, example_index: Tensor) -> Tensor: ...


class IncompatibleSpaceError(ValueError):
    """An estimator was constructed for a latent space it does not support."""


@attrs.frozen
class EstimatorConfig:
    """Base of every estimator's frozen, validated hyper-parameters."""


@attrs.frozen
class EstimatorResult:
    """What one estimator step returns (all tensors on the scores' device; no host sync needed).

    - ``surrogate`` ``[B]``: backpropagate ``surrogate.mean()`` (plus any regularizer) to get the estimator's
      gradient of the expected loss w.r.t. the encoder scores and the decoder parameters. Its value is not
      necessarily the objective.
    - ``objective`` ``[B]`` (detached): exact ``E_pi[loss]`` for marginalization, a Monte-Carlo estimate otherwise.
    - ``entropy`` ``[B]`` (differentiable): entropy of the encoder distribution pi(z|x).
    - ``support`` ``[B]`` (long): decoder rows evaluated for each example.
    - ``logs``: extra scalar tensors (temperature, baseline value, ...).
    """

    surrogate: Tensor
    objective: Tensor
    entropy: Tensor
    support: Tensor
    logs: Mapping[str, Tensor] = attrs.field(factory=dict)


C = TypeVar("C", bound=EstimatorConfig)


class Estimator(nn.Module, abc.ABC, Generic[C]):
    """Base class of all estimators (built-in and third-party).

    Subclasses set ``config_class`` (a frozen attrs class deriving from :class:`EstimatorConfig`) and
    ``supported_spaces`` and implement :meth:`forward`. Construction refuses unsupported latent spaces. An estimator
    that reads the encoder input (NVIL's learned baseline) sizes itself lazily from the first one it sees.
    """

    config_class: ClassVar[type[EstimatorConfig]] = EstimatorConfig
    supported_spaces: ClassVar[tuple[type[Categorical | BitVector], ...]] = (Categorical, BitVector)

    def __init__(self, space: LatentSpace, config: C | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(space, self.supported_spaces):
            accepted = ", ".join(s.__name__ for s in self.supported_spaces)
            raise IncompatibleSpaceError(
                f"estimator {name} does not support latent space {space!r}; it supports: {accepted}"
            )
        if config is None:
            config = self.config_class()  # type: ignore[assignment]
        if not isinstance(config, self.config_class):
            raise TypeError(f"{name} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.space: LatentSpace = space
        self.config: C = config

    @abc.abstractmethod
    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Estimate ``E_{pi(z|scores)}[loss_fn(z)]`` for scores ``[B, N]``; see :class:`EstimatorResult`."""

    def __call__(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        result: EstimatorResult = super().__call__(scores, loss_fn, encoder_input)
        return result

    def check_scores(self, scores: Tensor) -> None:
        """Raise a clear error unless ``scores`` is ``[B, space.size]``."""
        if scores.dim() != 2 or scores.shape[1] != self.space.size:
            raise ValueError(
                f"{type(self).__name__} expects scores of shape [B, {self.space.size}] for {self.space!r}, "
                f"got {tuple(scores.shape)}"
            )


def evaluate_rows(
    loss_fn: LossFn, z_rows: Tensor, example_index: Tensor, categories: Tensor | None = None
) -> Tensor:
    """Call ``loss_fn`` once on ``z_rows [R, N]`` and check it returns one loss per row ``[R]``.

    ``categories [R]``: the caller's statement that ``z_rows`` are the one-hot rows of these categories. When the
    rows carry no gradient and ``loss_fn`` has ``of_categories`` (see :class:`LossFn`), that is called instead.
    """
    of_categories = getattr(loss_fn, "of_categories", None)
    if categories is not None and of_categories is not None and not z_rows.requires_grad:
        losses: Tensor = of_categories(categories, example_index)
    else:
        losses = loss_fn(z_rows, example_index)
    if losses.shape != (z_rows.shape[0],):
        raise ValueError(
            f"loss_fn must return one loss per row, shape ({z_rows.shape[0]},), got {tuple(losses.shape)}"
        )
    return losses


def segment_sum(values: Tensor, example_index: Tensor, num_examples: int) -> Tensor:
    """Sum ``values [R]`` into ``[num_examples]`` by ``example_index [R]`` (differentiable)."""
    out = values.new_zeros(num_examples)
    return out.index_add(0, example_index, values)


@attrs.frozen
class SparseDistribution:
    """A distribution given by its nonzero rows only.

    ``z_rows [R, N]`` assignments, ``example_index [R]`` long (non-decreasing), ``probs [R]`` (differentiable
    w.r.t. the scores), over ``num_examples`` examples; each example's probs sum to 1. Sparse estimators list only
    rows with ``probs > 0``; a dense one (softmax) lists every row, including probabilities that underflow to 0.
    ``categories [R]``: for one-hot rows of a categorical space, the category of each row (else ``None``).
    """

    z_rows: Tensor
    example_index: Tensor
    probs: Tensor
    num_examples: int
    logs: Mapping[str, Tensor] = attrs.field(factory=dict)
    categories: Tensor | None = None


def marginalize(dist: SparseDistribution, loss_fn: LossFn, logs: Mapping[str, Tensor] | None = None) -> EstimatorResult:
    """Exact expectation of ``loss_fn`` under a sparse distribution: one loss call on its R support rows.

    The surrogate ``sum_z pi(z) loss(z)`` is the exact expected loss, so its gradient is exact w.r.t. both
    the decoder (through ``loss``) and the encoder (through ``probs``).
    """
    return expectation(dist, evaluate_rows(loss_fn, dist.z_rows, dist.example_index, dist.categories), logs)


def expectation(
    dist: SparseDistribution, losses: Tensor, logs: Mapping[str, Tensor] | None = None
) -> EstimatorResult:
    """The :class:`EstimatorResult` of ``sum_z pi(z) losses(z)`` given the losses ``[R]`` of ``dist``'s rows."""
    expected = segment_sum(dist.probs * losses, dist.example_index, dist.num_examples)
    plogp = dist.probs * torch.log(dist.probs.clamp_min(torch.finfo(dist.probs.dtype).tiny))
    entropy = -segment_sum(plogp, dist.example_index, dist.num_examples)
    # rows per example; index_add, unlike bincount (which reads the largest index on the host), never syncs
    index = dist.example_index
    support = torch.zeros(dist.num_examples, dtype=torch.long, device=index.device).index_add_(
        0, index, torch.ones_like(index)
    )
    return EstimatorResult(
        surrogate=expected,
        objective=expected.detach(),
        entropy=entropy,
        support=support,
        logs={**dist.logs, **(logs or {})},
    )


class MarginalizingEstimator(Estimator[C], abc.ABC):
    """An estimator that computes the expectation **exactly** under an explicit sparse distribution.

    Subclasses implement :meth:`distribution`; evaluation code (held-out ELBO, importance sampling with an exact
    support term) can call it directly to read the posterior rows and probabilities.
    """

    @abc.abstractmethod
    def distribution(self, scores: Tensor) -> SparseDistribution:
        """The nonzero-probability rows of the encoder distribution for scores ``[B, N]``."""

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Exact ``E_{distribution(scores)}[loss_fn]`` with one loss call on the support rows."""
        self.check_scores(scores)
        return marginalize(self.distribution(scores), loss_fn)


def dense_to_sparse(probs: Tensor, space: LatentSpace) -> SparseDistribution:
    """Keep the nonzero entries of categorical probabilities ``[B, K]`` as a :class:`SparseDistribution`.

    The number of rows is data-dependent, so the ``nonzero`` here is the one host synchronisation of a sparse
    step on an accelerator (inherent: the decoder's batch size must be known to launch it).
    """
    if not isinstance(space, Categorical):
        raise IncompatibleSpaceError(f"dense_to_sparse needs a Categorical space, got {space!r}")
    example_index, category = torch.nonzero(probs > 0, as_tuple=True)
    eye = torch.eye(space.K, dtype=probs.dtype, device=probs.device)
    return SparseDistribution(
        z_rows=eye[category],
        example_index=example_index,
        probs=probs[example_index, category],
        num_examples=probs.shape[0],
        categories=category,
    )


def describe_config(config_class: type[Any]) -> list[tuple[str, str, Any]]:
    """``(name, type, default)`` for each field of an attrs config class (for ``runner list``)."""
    rows: list[tuple[str, str, Any]] = []
    for field in attrs.fields(config_class):
        type_name = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        rows.append((field.name, str(type_name), field.default))
    return rows


def exact_distribution(estimator: Estimator[Any], scores: Tensor) -> SparseDistribution | None:
    """The exact posterior rows of ``estimator`` for ``scores [B, N]`` when it marginalizes
    (:class:`MarginalizingEstimator`), else ``None``: the one way evaluation code asks for an exact posterior."""
    return estimator.distribution(scores) if isinstance(estimator, MarginalizingEstimator) else None
