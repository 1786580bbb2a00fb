"""Exact marginalization estimators (softmax, sparsemax, 1.5-entmax) against the enumeration oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
from entmax import entmax15, sparsemax
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators.base import EstimatorConfig, IncompatibleSpaceError
from lvzoo.estimators.marginal import (
    Entmax15Marginal,
    MarginalEstimator,
    SoftmaxMarginal,
    SparsemaxMarginal,
    all_rows,
)
from lvzoo.estimators.spaces import BitVector, Categorical
from tests.oracle import QuadraticDecoderLoss, exact_expectation

NORMALIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": lambda s: torch.softmax(s, dim=-1),
    "sparsemax": lambda s: sparsemax(s, dim=-1),
    "entmax15": lambda s: entmax15(s, dim=-1),
}
CLASSES: dict[str, type[MarginalEstimator[Any]]] = {
    "softmax": SoftmaxMarginal,
    "sparsemax": SparsemaxMarginal,
    "entmax15": Entmax15Marginal,
}
NAMES = sorted(CLASSES)
BATCH, K = 6, 7


def make_scores(seed: int, scale: float = 2.0) -> Tensor:
    """Random float64 scores ``[BATCH, K]``; at scale 2 sparsemax/entmax leave some categories at zero."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, K, generator=g, dtype=torch.float64) * scale


def all_losses(loss: QuadraticDecoderLoss, batch: int, num_classes: int) -> Tensor:
    """Loss of every (example, category), ``[batch, num_classes]`` (detached)."""
    eye = torch.eye(num_classes, dtype=torch.float64)
    rows = eye.repeat(batch, 1)
    index = torch.arange(batch).repeat_interleave(num_classes)
    with torch.no_grad():
        losses: Tensor = loss(rows, index)
    return losses.reshape(batch, num_classes)


@pytest.mark.parametrize("name", NAMES)
def test_registered_under_its_name(name: str) -> None:
    assert registry.estimators.load(name) is CLASSES[name]


@pytest.mark.parametrize("name", NAMES)
def test_refuses_bit_vector_space(name: str) -> None:
    with pytest.raises(IncompatibleSpaceError, match="Categorical"):
        CLASSES[name](BitVector(4))


@pytest.mark.parametrize("name", NAMES)
def test_default_config_is_frozen_attrs(name: str) -> None:
    estimator = CLASSES[name](Categorical(K))
    assert attrs.has(type(estimator.config))
    assert isinstance(estimator.config, CLASSES[name].config_class)
    assert isinstance(estimator.config, EstimatorConfig)
    assert type(estimator.config).__attrs_attrs__ == ()  # no hyper-parameters
    with pytest.raises(TypeError, match="expects"):
        CLASSES[name](Categorical(K), config=EstimatorConfig())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_objective_and_gradients_equal_oracle(name: str, seed: int) -> None:
    space = Categorical(K)
    scores = make_scores(seed).requires_grad_(True)
    loss = QuadraticDecoderLoss(space, batch=BATCH, seed=seed)
    result = CLASSES[name](space)(scores, loss)
    result.surrogate.sum().backward()

    oracle_scores = scores.detach().clone().requires_grad_(True)
    oracle_loss = QuadraticDecoderLoss(space, batch=BATCH, seed=seed)
    exact = exact_expectation(space, NORMALIZERS[name](oracle_scores), oracle_loss)
    exact.sum().backward()

    torch.testing.assert_close(result.surrogate, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.objective, exact.detach(), rtol=1e-12, atol=1e-12)
    assert not result.objective.requires_grad
    assert scores.grad is not None and oracle_scores.grad is not None
    torch.testing.assert_close(scores.grad, oracle_scores.grad, rtol=1e-10, atol=1e-12)
    for param, oracle_param in zip(loss.parameters(), oracle_loss.parameters(), strict=True):
        assert param.grad is not None and oracle_param.grad is not None
        torch.testing.assert_close(param.grad, oracle_param.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_one_loss_call_on_exactly_the_nonzero_rows(name: str) -> None:
    space = Categorical(K)
    scores = make_scores(2)
    probs = NORMALIZERS[name](scores)
    seen: list[tuple[Tensor, Tensor]] = []

    def recording_loss(z_rows: Tensor, example_index: Tensor) -> Tensor:
        seen.append((z_rows, example_index))
        return z_rows.sum(-1)

    result = CLASSES[name](space)(scores, recording_loss)
    assert len(seen) == 1
    z_rows, example_index = seen[0]
    evaluated = {(int(b), int(c)) for b, c in zip(example_index, z_rows.argmax(-1), strict=True)}
    assert torch.all(z_rows.sum(-1) == 1)  # one-hot rows
    assert len(evaluated) == z_rows.shape[0]  # no duplicates
    if name == "softmax":
        expected = {(b, c) for b in range(BATCH) for c in range(K)}
        torch.testing.assert_close(result.support, torch.full((BATCH,), K))
    else:
        expected = {(int(b), int(c)) for b, c in torch.nonzero(probs > 0)}
        assert len(expected) < BATCH * K  # the test exercises zero probabilities
        torch.testing.assert_close(result.support, (probs > 0).sum(-1))
    assert evaluated == expected
    assert result.support.dtype == torch.long


@pytest.mark.parametrize("name", NAMES)
def test_entropy_is_shannon_with_finite_gradient(name: str) -> None:
    space = Categorical(K)
    scores = make_scores(3).requires_grad_(True)
    result = CLASSES[name](space)(scores, lambda z, b: z.sum(-1))
    result.entropy.sum().backward()

    oracle_scores = scores.detach().clone().requires_grad_(True)
    probs = NORMALIZERS[name](oracle_scores)
    safe = torch.where(probs > 0, probs, torch.ones_like(probs))
    reference = -(probs * torch.log(safe)).sum(-1)
    reference.sum().backward()

    if name != "softmax":
        assert bool((probs == 0).any())  # zero probabilities are present
    torch.testing.assert_close(result.entropy, reference.detach(), rtol=1e-12, atol=1e-12)
    assert scores.grad is not None and oracle_scores.grad is not None
    assert bool(torch.isfinite(scores.grad).all())
    torch.testing.assert_close(scores.grad, oracle_scores.grad, rtol=1e-10, atol=1e-12)


def test_sparsemax_gradient_is_closed_form_jacobian() -> None:
    """d/ds sum_z p_z l_z = J^T l with J = I - 11^T/|S| on the support S, zero outside."""
    space = Categorical(K)
    scores = make_scores(4).requires_grad_(True)
    loss = QuadraticDecoderLoss(space, batch=BATCH, seed=4)
    result = SparsemaxMarginal(space)(scores, loss)
    result.surrogate.sum().backward()

    losses = all_losses(loss, BATCH, K)
    on_support = (sparsemax(scores.detach(), dim=-1) > 0).to(torch.float64)
    expected = torch.zeros(BATCH, K, dtype=torch.float64)
    for b in range(BATCH):
        support = on_support[b].bool()
        size = int(support.sum())
        jacobian = torch.eye(size, dtype=torch.float64) - torch.ones(size, size, dtype=torch.float64) / size
        expected[b, support] = jacobian @ losses[b, support]
    assert bool((on_support == 0).any()) and bool((on_support.sum(-1) > 1).any())
    assert scores.grad is not None
    torch.testing.assert_close(scores.grad, expected, rtol=1e-10, atol=1e-12)


def test_softmax_evaluates_underflowed_rows() -> None:
    """The dense baseline keeps all K rows even where a float32 probability is exactly zero."""
    space = Categorical(3)
    scores = torch.tensor([[0.0, -1000.0, 1.0], [2.0, 2.0, 2.0]], requires_grad=True)
    loss_rows: list[int] = []

    def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
        loss_rows.append(z_rows.shape[0])
        return (z_rows * torch.tensor([1.0, 5.0, 3.0])).sum(-1)

    result = SoftmaxMarginal(space)(scores, loss_fn)
    probs = torch.softmax(scores.detach(), dim=-1)
    assert probs[0, 1] == 0
    assert loss_rows == [6]
    torch.testing.assert_close(result.support, torch.tensor([3, 3]))
    torch.testing.assert_close(result.objective, probs @ torch.tensor([1.0, 5.0, 3.0]))
    (result.surrogate.sum() + result.entropy.sum()).backward()
    assert scores.grad is not None and bool(torch.isfinite(scores.grad).all())
    assert bool(torch.isfinite(result.entropy).all())


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    scores=hnp.arrays(
        dtype="float64",
        shape=st.tuples(st.integers(1, 4), st.integers(1, 9)),
        elements=st.floats(-20, 20, allow_nan=False),
    ),
)
def test_probabilities_on_simplex_and_objective_is_their_average(name: str, scores: object) -> None:
    scores_t = torch.as_tensor(scores)
    batch, num_classes = scores_t.shape
    values = torch.linspace(-1.0, 2.0, num_classes, dtype=torch.float64)
    estimator = CLASSES[name](Categorical(num_classes))
    probs = estimator.normalize(scores_t)
    result = estimator(scores_t, lambda z, b: z @ values)
    assert bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.objective, probs @ values, rtol=0, atol=1e-12)
    assert bool((result.support >= 1).all()) and bool((result.support <= num_classes).all())
    if name != "softmax":
        torch.testing.assert_close(result.support, (probs > 0).sum(-1))
    assert bool((result.entropy >= -1e-12).all())


@pytest.mark.parametrize("name", NAMES)
def test_normalizers_run_on_meta_tensors(name: str) -> None:
    """No host round trip in the normalizers or the dense row builder (meta tensors have no data)."""
    estimator = CLASSES[name](Categorical(K))
    probs = estimator.normalize(torch.empty(BATCH, K, device="meta"))
    assert probs.device.type == "meta" and probs.shape == (BATCH, K)
    dist = all_rows(probs, Categorical(K))
    assert dist.z_rows.shape == (BATCH * K, K) and dist.example_index.shape == (BATCH * K,)
    assert dist.probs.device.type == "meta"
