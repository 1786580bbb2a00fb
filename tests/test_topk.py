"""k-best bit vectors and the top-k sparsemax estimator, against brute-force enumeration."""

from __future__ import annotations

import attrs
import pytest
import torch
from entmax import sparsemax
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators.base import IncompatibleSpaceError
from lvzoo.estimators.spaces import BitVector, Categorical
from lvzoo.estimators.topk import (
    TopKSparsemax,
    TopKSparsemaxConfig,
    _flip_set_table,
    _kbest_budgeted,
    _kbest_budgeted_shapes,
    kbest_bitvectors,
    topk_sparsemax,
)
from tests.oracle import QuadraticDecoderLoss, exact_expectation, exact_gradient


def check_kbest(t: Tensor, k: int, budget: int | None) -> tuple[Tensor, Tensor]:
    """Assert ``kbest_bitvectors(t, k, budget)`` is an exact, feasible, sorted k-best list; return it."""
    batch, dim = t.shape
    space = BitVector(dim, budget)
    z, scores = kbest_bitvectors(t, k, budget)
    assert z.shape == (batch, k, dim) and scores.shape == (batch, k)
    assert z.dtype == t.dtype and scores.dtype == t.dtype
    assert bool(((z == 0) | (z == 1)).all())
    if budget is not None:
        assert bool((z.sum(-1) <= budget).all())
    for b in range(batch):
        assert torch.unique(z[b], dim=0).shape[0] == k  # distinct
    torch.testing.assert_close(scores, (z * t.unsqueeze(1)).sum(-1), rtol=0, atol=1e-12)
    assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-12).all())  # decreasing
    all_scores = t @ space.enumerate().to(t).T
    best = torch.sort(all_scores, dim=-1, descending=True).values[:, :k]
    torch.testing.assert_close(scores, best, rtol=0, atol=1e-12)  # same multiset of the top-k scores
    return z, scores


def _random_budget_and_k(dim: int, use_budget: bool, g: torch.Generator) -> tuple[int | None, int]:
    """A random budget in ``[1, dim]`` (``None`` unless ``use_budget``) and ``k`` in ``[1, min(feasible, 40)]``."""
    budget = int(torch.randint(1, dim + 1, (), generator=g)) if use_budget else None
    feasible = BitVector(dim, budget).num_assignments()
    return budget, int(torch.randint(1, min(feasible, 40) + 1, (), generator=g))


@pytest.mark.parametrize("use_budget", [False, True])
@pytest.mark.parametrize("dim", range(1, 9))
def test_kbest_equals_brute_force_on_random_scores(dim: int, use_budget: bool) -> None:
    g = torch.Generator().manual_seed(100 * dim + use_budget)
    for _ in range(4):
        budget, k = _random_budget_and_k(dim, use_budget, g)
        t = torch.randn(3, dim, generator=g, dtype=torch.float64) * 2
        check_kbest(t, k, budget)


@pytest.mark.parametrize("use_budget", [False, True])
@pytest.mark.parametrize("dim", range(1, 9))
def test_kbest_equals_brute_force_with_ties(dim: int, use_budget: bool) -> None:
    """Integer scores (many zeros and repeats) and constant scores make many assignments tie."""
    g = torch.Generator().manual_seed(7 * dim + use_budget)
    for _ in range(4):
        budget, k = _random_budget_and_k(dim, use_budget, g)
        integer = torch.randint(-2, 3, (3, dim), generator=g).to(torch.float64)
        repeated = torch.full((2, dim), 1.5, dtype=torch.float64)
        repeated[1] = -1.5
        check_kbest(torch.cat([integer, repeated, torch.zeros(1, dim, dtype=torch.float64)]), k, budget)


@pytest.mark.parametrize("budget", [None, 1, 2, 4])
def test_kbest_with_k_equal_to_all_assignments_lists_all(budget: int | None) -> None:
    space = BitVector(4, budget)
    k = space.num_assignments()
    t = torch.tensor([[0.3, -1.2, 0.7, -0.1]], dtype=torch.float64)
    z, _ = check_kbest(t, k, budget)
    listed = {tuple(row) for row in z[0].tolist()}
    assert listed == {tuple(row) for row in space.enumerate().tolist()}


@pytest.mark.parametrize(("dim", "budget"), [(3, None), (3, 1), (5, 2), (1, None)])
def test_kbest_refuses_k_above_feasible(dim: int, budget: int | None) -> None:
    too_many = BitVector(dim, budget).num_assignments() + 1
    with pytest.raises(ValueError, match=rf"k={too_many}.*D={dim}, budget={budget}"):
        kbest_bitvectors(torch.zeros(2, dim), too_many, budget)
    with pytest.raises(ValueError, match="k=0"):
        kbest_bitvectors(torch.zeros(2, dim), 0, budget)


@pytest.mark.parametrize("budget", [None, 3])
def test_kbest_runs_on_meta_tensors(budget: int | None) -> None:
    """No host round trip: the whole search runs on a data-less meta tensor."""
    t = torch.empty(5, 6, device="meta")
    z, scores = kbest_bitvectors(t, 7, budget)
    assert z.device.type == "meta" and z.shape == (5, 7, 6) and scores.shape == (5, 7)
    z, q = topk_sparsemax(t, 7, budget)
    assert q.device.type == "meta" and q.shape == (5, 7)


def test_registered_and_refuses_categorical() -> None:
    assert registry.estimators.load("topksparse") is TopKSparsemax
    with pytest.raises(IncompatibleSpaceError, match="BitVector"):
        TopKSparsemax(Categorical(4))


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_config_refuses_bad_k(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"k must be an int >= 1, got {bad!r}"):
        TopKSparsemaxConfig(k=bad)  # type: ignore[arg-type]


def test_config_is_frozen_with_paper_default() -> None:
    config = TopKSparsemaxConfig()
    assert config.k == 10
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.k = 3  # type: ignore[misc]


@pytest.mark.parametrize(("dim", "budget"), [(3, None), (4, 1), (5, 2)])
def test_estimator_refuses_k_above_feasible_and_allows_equal(dim: int, budget: int | None) -> None:
    space = BitVector(dim, budget)
    feasible = space.num_assignments()
    with pytest.raises(ValueError, match=rf"k={feasible + 1}.*D={dim}, budget={budget}"):
        TopKSparsemax(space, TopKSparsemaxConfig(k=feasible + 1))
    estimator = TopKSparsemax(space, TopKSparsemaxConfig(k=feasible))
    result = estimator(torch.zeros(2, dim, dtype=torch.float64), lambda z, b: z.sum(-1))
    torch.testing.assert_close(result.support, torch.full((2,), feasible))  # all scores tie: uniform


def membership(z: Tensor, table: Tensor) -> Tensor:
    """``[B, k, N]`` 0/1: which enumerated assignment (row of ``table [N, D]``) each ``z [B, k, D]`` is."""
    return (z.unsqueeze(2) == table).all(-1).to(z.dtype)


def dense_topk_sparsemax(t: Tensor, table: Tensor, k: int) -> Tensor:
    """Reference ``sparsemax(top_k(s))`` over all assignments, ``[B, N]``, with brute-force top-k held fixed."""
    all_scores = t @ table.T
    top = torch.topk(all_scores.detach(), k, dim=-1).indices
    kept = sparsemax(all_scores.gather(1, top), dim=-1)
    return torch.zeros_like(all_scores).scatter(1, top, kept)


SPACES = [(BitVector(5), 10), (BitVector(6, 3), 10), (BitVector(4, 2), 4), (BitVector(3), 8)]


@pytest.mark.parametrize(("space", "k"), SPACES)
def test_topk_sparsemax_certificate_and_projection(space: BitVector, k: int) -> None:
    """Support < k: equals full sparsemax over all assignments; support == k: sparsemax over the true top-k."""
    g = torch.Generator().manual_seed(space.D)
    scales = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0], dtype=torch.float64)
    t = torch.randn(len(scales), space.D, generator=g, dtype=torch.float64) * scales[:, None]
    table = space.enumerate().to(t)
    z, q = topk_sparsemax(t, k, space.budget)
    dense = (q.unsqueeze(-1) * membership(z, table)).sum(1)
    torch.testing.assert_close(dense.sum(-1), torch.ones(len(scales), dtype=torch.float64))
    support = (q > 0).sum(-1)
    full = sparsemax(t @ table.T, dim=-1)
    certified = support < k
    if k < table.shape[0]:
        assert bool(certified.any()) and bool((~certified).any())  # both regimes are exercised
    torch.testing.assert_close(dense[certified], full[certified], rtol=0, atol=1e-12)
    torch.testing.assert_close(dense, dense_topk_sparsemax(t, table, k), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("space", "k"), SPACES)
def test_estimator_equals_oracle_expectation_and_gradient(space: BitVector, k: int) -> None:
    batch = 6
    g = torch.Generator().manual_seed(10 + space.D)
    scales = torch.tensor([0.1, 0.3, 1.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    t = (torch.randn(batch, space.D, generator=g, dtype=torch.float64) * scales[:, None]).requires_grad_(True)
    table = space.enumerate().to(t.dtype)
    loss = QuadraticDecoderLoss(space, batch=batch, seed=space.D)
    result = TopKSparsemax(space, TopKSparsemaxConfig(k=k))(t, loss)
    calls, rows = loss.calls, loss.rows
    result.surrogate.sum().backward()

    oracle_loss = QuadraticDecoderLoss(space, batch=batch, seed=space.D)
    probs = dense_topk_sparsemax(t.detach(), table, k)
    exact = exact_expectation(space, probs, oracle_loss)
    exact.sum().backward()
    grad = exact_gradient(space, t, lambda s: dense_topk_sparsemax(s, table, k), loss)

    torch.testing.assert_close(result.surrogate, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.objective, exact.detach(), rtol=1e-12, atol=1e-12)
    assert t.grad is not None
    torch.testing.assert_close(t.grad, grad, rtol=1e-10, atol=1e-12)
    for param, oracle_param in zip(loss.parameters(), oracle_loss.parameters(), strict=True):
        assert param.grad is not None and oracle_param.grad is not None
        torch.testing.assert_close(param.grad, oracle_param.grad, rtol=1e-10, atol=1e-12)

    nonzero = (probs > 0).sum(-1)
    assert calls == 1 and rows == int(nonzero.sum())  # one call, on the nonzero rows only
    torch.testing.assert_close(result.support, nonzero)
    safe = torch.where(probs > 0, probs, torch.ones_like(probs))
    torch.testing.assert_close(result.entropy, -(probs * safe.log()).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.logs["support_at_k"], (nonzero == k).to(t.dtype).mean())


def test_estimator_entropy_gradient_is_finite() -> None:
    space = BitVector(5)
    t = (torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3).requires_grad_(True)
    result = TopKSparsemax(space)(t, lambda z, b: z.sum(-1))
    assert bool((result.support < 10).any())  # some of the k candidates have zero probability
    result.entropy.sum().backward()
    assert t.grad is not None and bool(torch.isfinite(t.grad).all())


@st.composite
def topk_problems(draw: st.DrawFn) -> tuple[Tensor, int, int | None]:
    dim = draw(st.integers(1, 6))
    budget = draw(st.none() | st.integers(1, dim))
    k = draw(st.integers(1, min(BitVector(dim, budget).num_assignments(), 16)))
    batch = draw(st.integers(1, 3))
    values = draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=batch * dim, max_size=batch * dim))
    return torch.tensor(values, dtype=torch.float64).reshape(batch, dim), k, budget


@settings(max_examples=80, deadline=None)
@given(problem=topk_problems())
def test_topk_sparsemax_properties(problem: tuple[Tensor, int, int | None]) -> None:
    t, k, budget = problem
    check_kbest(t, k, budget)
    z, q = topk_sparsemax(t, k, budget)
    assert bool((q >= 0).all())
    torch.testing.assert_close(q.sum(-1), torch.ones(t.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    result = TopKSparsemax(BitVector(t.shape[1], budget), TopKSparsemaxConfig(k=k))(t, lambda rows, b: rows.sum(-1))
    assert bool((result.support >= 1).all()) and bool((result.support <= k).all())
    torch.testing.assert_close(result.support, (q > 0).sum(-1))
    torch.testing.assert_close(result.objective, (q * z.sum(-1)).sum(-1), rtol=0, atol=1e-12)
    if budget is not None:
        assert bool((z.sum(-1) <= budget).all())


def test_flip_set_table_is_the_down_closed_family_of_brute_force() -> None:
    """The candidate flip sets are exactly those preceded by fewer than k sets (checked by enumeration)."""
    num_flippable = 6
    subsets = [tuple(i for i in range(num_flippable) if mask >> i & 1) for mask in range(1 << num_flippable)]

    def precedes(g: tuple[int, ...], f: tuple[int, ...]) -> bool:
        return len(g) <= len(f) and all(g[-1 - j] <= f[-1 - j] for j in range(len(g)))

    for k in (2, 5, 10, 20):
        table = _flip_set_table(k, num_flippable)
        listed = {tuple(int(i) for i in torch.nonzero(row).flatten()) for row in table}
        expected = {f for f in subsets if sum(precedes(g, f) and g != f for g in subsets) < k}
        assert listed == expected and len(listed) >= k


@pytest.mark.parametrize(("k", "budget"), [(10, 20), (4, 3), (23, 12)])
def test_budgeted_shapes_agree_with_hole_program(k: int, budget: int) -> None:
    """At a size too large for brute force, the two exact budgeted searches return the same k best scores."""
    g = torch.Generator().manual_seed(k)
    t = torch.cat([torch.randn(6, 40, generator=g, dtype=torch.float64) * scale for scale in (0.1, 1.0, 5.0)])
    t[0, :10] = 0.0  # ties
    for bits in (_kbest_budgeted_shapes(t, k, budget), _kbest_budgeted(t, k, budget)):
        assert bool((bits.sum(-1) <= budget).all())
        for b in range(t.shape[0]):
            assert torch.unique(bits[b], dim=0).shape[0] == k
    shape_scores = (_kbest_budgeted_shapes(t, k, budget).to(t.dtype) * t.unsqueeze(1)).sum(-1)
    program_scores = (_kbest_budgeted(t, k, budget).to(t.dtype) * t.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(
        shape_scores.sort(-1, descending=True).values,
        program_scores.sort(-1, descending=True).values,
        atol=1e-12,
        rtol=0,
    )


def test_hole_program_path_equals_brute_force() -> None:
    """k above the shape-enumeration limit goes through the hole dynamic program."""
    t = torch.randn(3, 8, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    check_kbest(torch.cat([t, torch.zeros(1, 8, dtype=torch.float64)]), 30, 4)
