"""SparseMAP over bit vectors: closed-form marginals, KKT/duality certificates by brute force over all vertices,
the QP optimum against an independent solver, exact gradients against finite differences, and the estimator."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators.base import IncompatibleSpaceError
from lvzoo.estimators.spaces import BitVector, Categorical
from lvzoo.estimators.sparsemap import (
    DECOMPOSITIONS,
    SparseMAP,
    SparseMAPConfig,
    SparseMAPSolution,
    solve_sparsemap,
    sparsemap,
    sparsemap_marginals,
)
from lvzoo.estimators.sparsemap_decompositions import (
    _affinely_independent,
    _dyadic_decomposition,
    _KKTWeights,
    _path_kkt_direction,
    _systematic_decomposition,
)
from tests.oracle import QuadraticDecoderLoss, exact_expectation, exact_gradient

F64 = torch.float64
BUDGETS = [None, 2, 3]


def _scores(batch: int, dim: int, seed: int, scale: float = 1.5) -> Tensor:
    """Random float64 scores ``[batch, dim]``: a mix of clipped (|t| > 1) and fractional bits."""
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _degenerate_scores(batch: int, dim: int, seed: int) -> Tensor:
    """Scores with exact ties and kinks: entries drawn from a few special values (marginals 0, 1/2, 1, ...)."""
    values = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=F64)
    pick = torch.randint(len(values), (batch, dim), generator=torch.Generator().manual_seed(seed))
    return values[pick]


def _marginals(solution: SparseMAPSolution) -> Tensor:
    """``A xi`` restricted to the on-bits: ``sum_z xi_z z``, ``[B, D]``."""
    return torch.einsum("bc,bcd->bd", solution.weights.detach() * solution.active, solution.vertices)


def _bisection_marginals(t: Tensor, budget: int | None) -> Tensor:
    """Independent reference: ``clip((t + 1)/2 - lam, 0, 1)`` with ``lam`` by 200 bisection steps."""
    u = (t + 1) / 2
    if budget is None:
        return u.clamp(0, 1)
    low = torch.zeros_like(u[:, :1])
    high = u.abs().amax(-1, keepdim=True) + 2
    for _ in range(200):
        middle = (low + high) / 2
        over = (u - middle).clamp(0, 1).sum(-1, keepdim=True) > budget
        low = torch.where(over, middle, low)
        high = torch.where(over, high, middle)
    binding = u.clamp(0, 1).sum(-1, keepdim=True) > budget
    return (u - torch.where(binding, high, torch.zeros_like(high))).clamp(0, 1)


def _lift(z: Tensor) -> Tensor:
    """``a_z = (z, 1 - z)``."""
    return torch.cat([z, 1 - z], dim=-1)


def _vertex_gradients(t_row: Tensor, solution: SparseMAPSolution, b: int, table: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient ``<a_z, A xi> - <z, t>`` of the QP w.r.t. ``xi_z`` for the active vertices and for all of ``table``."""
    active = solution.active[b]
    vertices = solution.vertices[b][active]
    weights = solution.weights[b].detach()[active]
    lifted_point = weights @ _lift(vertices)
    return _lift(vertices) @ lifted_point - vertices @ t_row, _lift(table) @ lifted_point - table @ t_row


def _check_solution(t: Tensor, solution: SparseMAPSolution, budget: int | None) -> None:
    """Simplex, support, feasibility and brute-force KKT/duality certificate for every example."""
    batch, dim = t.shape
    weights = solution.weights.detach()
    assert solution.vertices.shape[1] <= dim + 1
    assert bool((weights[~solution.active] == 0).all())
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, dtype=F64), atol=1e-12, rtol=0)
    assert bool(((solution.vertices == 0) | (solution.vertices == 1)).all())
    if budget is not None:
        assert bool((solution.vertices.sum(-1)[solution.active] <= budget).all())
    table = BitVector(dim, budget).enumerate().to(F64)
    for b in range(batch):
        active_vertices = solution.vertices[b][solution.active[b]]
        assert torch.unique(active_vertices, dim=0).shape[0] == active_vertices.shape[0]
        active_gradients, all_gradients = _vertex_gradients(t[b], solution, b, table)
        tau = active_gradients.mean()
        scale = max(1.0, float(t[b].abs().max()))
        assert float((active_gradients - tau).abs().max()) <= 1e-9 * scale
        assert float(all_gradients.min()) >= float(tau) - 1e-9 * scale


def _qp_objective(t: Tensor, mu: Tensor) -> Tensor:
    """``1/2 ||A xi||^2 - <s, xi>`` as a function of the marginals, ``[B]``."""
    return (0.5 * (mu**2 + (1 - mu) ** 2) - t * mu).sum(-1)


def _project_simplex(x: Tensor) -> Tensor:
    """Euclidean projection of each row of ``x [B, N]`` onto the probability simplex (sort-based)."""
    ordered = x.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1) - 1
    index = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    support = (ordered - cumulative / index > 0).sum(-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support
    return (x - threshold).clamp_min(0)


def _bruteforce_qp(t: Tensor, budget: int | None, steps: int = 4000) -> tuple[Tensor, Tensor]:
    """Accelerated projected gradient on the simplex over all feasible vertices: ``(objective, lower bound)``.

    The lower bound subtracts the Frank-Wolfe duality gap, so it is a certified bound on the optimum.
    """
    dim = t.shape[1]
    table = BitVector(dim, budget).enumerate().to(F64)
    lifted = _lift(table)
    gram = lifted @ lifted.T
    linear = t @ table.T  # [B, N]
    step = 1 / float(torch.linalg.eigvalsh(gram).max())
    xi = torch.full_like(linear, 1 / table.shape[0])
    previous = xi
    for k in range(steps):
        extrapolated = xi + (k / (k + 3)) * (xi - previous)
        previous = xi
        xi = _project_simplex(extrapolated - step * (extrapolated @ gram - linear))
    gradient = xi @ gram - linear
    objective = 0.5 * ((xi @ gram) * xi).sum(-1) - (linear * xi).sum(-1)
    gap = (gradient * xi).sum(-1) - gradient.min(-1).values
    return objective, objective - gap


class _RowRecorder:
    """A per-row loss ``c(z, b) = sin(<z, w_b>) + <z, v_b>^2 / 4`` that records the rows it was called with."""

    def __init__(self, batch: int, dim: int, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(batch, dim, generator=g, dtype=F64)
        self.v = torch.randn(batch, dim, generator=g, dtype=F64)
        self.calls: list[tuple[Tensor, Tensor]] = []

    def __call__(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        self.calls.append((z_rows.detach().clone(), example_index.clone()))
        return torch.sin((z_rows * self.w[example_index]).sum(-1)) + (z_rows * self.v[example_index]).sum(-1) ** 2 / 4

    def rows_of(self, call: int, b: int) -> set[tuple[float, ...]]:
        z_rows, example_index = self.calls[call]
        return {tuple(row.tolist()) for row in z_rows[example_index == b]}


def _dense_probs(solution: SparseMAPSolution, space: BitVector) -> Tensor:
    """The solution as dense probabilities over ``space.enumerate()``, ``[B, N]`` (differentiable in the weights)."""
    table = space.enumerate().to(F64)
    matches = (solution.vertices.unsqueeze(2) == table.view(1, 1, *table.shape)).all(-1).to(F64)  # [B, C, N]
    return torch.einsum("bc,bcn->bn", solution.weights * solution.active, matches)


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_marginals_equal_closed_form(budget: int | None, decomposition: str) -> None:
    t = torch.cat([_scores(12, 7, seed=1), _degenerate_scores(12, 7, seed=2)])
    solution = solve_sparsemap(t, budget, decomposition=decomposition)
    assert bool(solution.converged.all())
    closed_form = sparsemap_marginals(t, budget)
    torch.testing.assert_close(_marginals(solution), closed_form, atol=1e-10, rtol=0)
    torch.testing.assert_close(closed_form, _bisection_marginals(t, budget), atol=1e-12, rtol=0)
    if budget is not None:
        assert float(closed_form.sum(-1).max()) <= budget + 1e-12


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_kkt_certificate_by_brute_force(budget: int | None, decomposition: str) -> None:
    t = torch.cat([_scores(10, 6, seed=3), _degenerate_scores(10, 6, seed=4)])
    _check_solution(t, solve_sparsemap(t, budget, decomposition=decomposition), budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_objective_equals_bruteforce_qp(budget: int | None) -> None:
    t = _scores(6, 4, seed=5)
    solution = solve_sparsemap(t, budget)
    ours = _qp_objective(t, _marginals(solution))
    upper, lower = _bruteforce_qp(t, budget)
    assert float((upper - lower).max()) < 1e-6  # the reference is itself accurate
    assert bool((ours <= upper + 1e-12).all())
    assert bool((ours >= lower - 1e-12).all())
    torch.testing.assert_close(ours, _qp_objective(t, sparsemap_marginals(t, budget)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("decomposition", ["exact", "active_set"])
@pytest.mark.parametrize("budget", [None, 3])
def test_gradients_match_finite_differences(budget: int | None, decomposition: str) -> None:
    """d/dt of sum_z xi_z c(z) through the estimator vs central differences, all 2 B D perturbations in one batch.

    (The dyadic active set changes under any perturbation; its backward is checked against the KKT system below.)"""
    batch, dim, h = 6, 6, 1e-6
    space = BitVector(dim, budget)
    estimator = SparseMAP(space, SparseMAPConfig(decomposition=decomposition))
    t = _scores(batch, dim, seed=6).requires_grad_(True)
    loss = _RowRecorder(batch, dim)
    estimator(t, loss).surrogate.sum().backward()  # type: ignore[no-untyped-call]
    assert t.grad is not None
    # row (sign, i, b) of the big batch is example b with t[b, i] shifted by sign * h
    shifted = t.detach().repeat(2 * dim, 1).view(2, dim, batch, dim)
    coordinate = torch.arange(dim)
    shifted[0, coordinate, :, coordinate] += h
    shifted[1, coordinate, :, coordinate] -= h
    big_loss = _RowRecorder(batch, dim)
    big_loss.w, big_loss.v = loss.w.repeat(2 * dim, 1), loss.v.repeat(2 * dim, 1)
    big_estimator = SparseMAP(BitVector(dim, budget), SparseMAPConfig(decomposition=decomposition))
    values = big_estimator(shifted.reshape(-1, dim), big_loss).objective.view(2, dim, batch)
    finite_differences = ((values[0] - values[1]) / (2 * h)).T  # [B, D]
    stable = 0
    for b in range(batch):
        base_rows = loss.rows_of(0, b)
        rows = [big_loss.rows_of(0, (sign * dim + i) * batch + b) for sign in (0, 1) for i in range(dim)]
        if any(perturbed != base_rows for perturbed in rows):
            continue  # the active set changes under the perturbation: not a point of differentiability
        stable += 1
        torch.testing.assert_close(t.grad[b], finite_differences[b], atol=1e-6, rtol=1e-6)
    assert stable >= batch - 1


def test_chain_backward_equals_dense_kkt_solve() -> None:
    t = _scores(8, 9, seed=8)
    solution = solve_sparsemap(t, decomposition="exact")
    weights = solution.weights.detach()
    cotangent = torch.randn(weights.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    gradients = []
    for nested in (True, False):
        leaf = t.clone().requires_grad_(True)
        out = _KKTWeights.apply(
            leaf, solution.vertices, solution.active, weights, torch.full((8,), nested), None, weights.shape[1]
        )
        (gradients.append(torch.autograd.grad((out * cotangent).sum(), leaf)[0]))
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-12, rtol=1e-10)
    assert float(gradients[0].abs().max()) > 0.1


def test_max_iter_keeps_a_feasible_distribution() -> None:
    t = _scores(5, 8, seed=10)
    truncated = solve_sparsemap(t, 3, max_iter=2, decomposition="active_set")
    assert not bool(truncated.converged.all())
    torch.testing.assert_close(truncated.weights.sum(-1), torch.ones(5, dtype=F64), atol=1e-12, rtol=0)
    assert bool((truncated.weights >= 0).all())
    full = solve_sparsemap(t, 3, decomposition="active_set")
    assert full.iterations > 2 and bool(full.converged.all())


def test_closed_form_decompositions_need_no_iterations() -> None:
    t = _scores(16, 32, seed=11)
    for budget in (None, 16):
        solution = solve_sparsemap(t, budget)
        assert solution.iterations == 0
        assert bool(solution.converged.all())


def test_deterministic_and_global_rng_untouched() -> None:
    t = _scores(6, 7, seed=12)
    for budget in (None, 3):
        for decomposition in DECOMPOSITIONS:
            state = torch.get_rng_state()
            first = solve_sparsemap(t, budget, decomposition=decomposition)
            second = solve_sparsemap(t, budget, decomposition=decomposition)
            assert torch.equal(torch.get_rng_state(), state)
            assert torch.equal(first.vertices, second.vertices)
            assert torch.equal(first.weights, second.weights)
            assert torch.equal(first.active, second.active)


def test_pure_function_and_float32() -> None:
    t = _scores(4, 10, seed=13).to(torch.float32).requires_grad_(True)
    vertices, weights, active = sparsemap(t, 4)
    assert vertices.dtype == weights.dtype == torch.float32 and active.dtype == torch.bool
    mu = torch.einsum("bc,bcd->bd", weights * active, vertices)
    torch.testing.assert_close(mu, sparsemap_marginals(t.detach(), 4), atol=1e-6, rtol=0)
    (weights * torch.arange(weights.shape[1], dtype=torch.float32)).sum().backward()  # type: ignore[no-untyped-call]
    assert t.grad is not None and t.grad.dtype == torch.float32 and bool(t.grad.abs().sum() > 0)


special_values = st.sampled_from([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    dim=st.integers(1, 6),
    decomposition=st.sampled_from(DECOMPOSITIONS),
)
def test_property_simplex_support_budget_certificate(data: st.DataObject, dim: int, decomposition: str) -> None:
    budget = data.draw(st.one_of(st.none(), st.integers(1, dim)))
    entry = st.one_of(special_values, st.floats(-4.0, 4.0, allow_nan=False, allow_subnormal=False))
    rows = data.draw(st.lists(st.lists(entry, min_size=dim, max_size=dim), min_size=1, max_size=4))
    t = torch.tensor(rows, dtype=F64)
    solution = solve_sparsemap(t, budget, decomposition=decomposition)
    assert bool(solution.converged.all())
    assert bool((solution.active.sum(-1) <= dim + 1).all())
    _check_solution(t, solution, budget)
    scale = max(1.0, float(t.abs().max()))  # the active-set tolerance is relative to max(1, max|t|)
    torch.testing.assert_close(_marginals(solution), sparsemap_marginals(t, budget), atol=1e-9 * scale, rtol=0)


@pytest.mark.parametrize("budget", [None, 3])
def test_estimator_objective_support_and_single_call(budget: int | None) -> None:
    batch, dim = 5, 6
    space = BitVector(dim, budget)
    t = _scores(batch, dim, seed=14)
    loss = QuadraticDecoderLoss(space, batch)
    recorder_rows: list[tuple[Tensor, Tensor]] = []

    def recording_loss(z_rows: Tensor, example_index: Tensor) -> Tensor:
        recorder_rows.append((z_rows, example_index))
        out: Tensor = loss(z_rows, example_index)
        return out

    result = SparseMAP(space)(t, recording_loss)
    assert loss.calls == 1 and len(recorder_rows) == 1
    solution = solve_sparsemap(t, budget)
    expected = torch.zeros(batch, dtype=F64)
    positive = solution.active & (solution.weights.detach() > 0)
    with torch.no_grad():
        for b in range(batch):
            for z, weight in zip(solution.vertices[b][positive[b]], solution.weights[b][positive[b]], strict=True):
                expected[b] += weight * loss(z.unsqueeze(0), torch.tensor([b]))[0]
    torch.testing.assert_close(result.objective, expected, atol=1e-12, rtol=1e-12)
    z_rows, example_index = recorder_rows[0]
    assert z_rows.shape[0] == int(positive.sum())
    assert torch.equal(result.support, positive.sum(-1))
    assert bool((example_index[1:] >= example_index[:-1]).all())
    if budget is not None:
        assert bool((z_rows.sum(-1) <= budget).all())
    assert float(result.logs["sparsemap_iterations"]) == 0.0
    assert float(result.logs["sparsemap_converged"]) == 1.0
    torch.testing.assert_close(result.logs["sparsemap_mean_support"], positive.sum(-1).to(F64).mean())
    assert bool((result.entropy >= 0).all())


@pytest.mark.parametrize("budget", [None, 2])
def test_estimator_gradients_match_oracle(budget: int | None) -> None:
    batch, dim = 4, 5
    space = BitVector(dim, budget)
    t = _scores(batch, dim, seed=15)

    def probs_fn(scores: Tensor) -> Tensor:
        return _dense_probs(solve_sparsemap(scores, budget), space)

    estimator_loss = QuadraticDecoderLoss(space, batch)
    leaf = t.clone().requires_grad_(True)
    SparseMAP(space)(leaf, estimator_loss).surrogate.sum().backward()  # type: ignore[no-untyped-call]
    oracle_loss = QuadraticDecoderLoss(space, batch)
    exact_expectation(space, probs_fn(t).detach(), oracle_loss).sum().backward()  # type: ignore[no-untyped-call]
    for ours, reference in zip(estimator_loss.parameters(), oracle_loss.parameters(), strict=True):
        assert ours.grad is not None and reference.grad is not None
        torch.testing.assert_close(ours.grad, reference.grad, atol=1e-12, rtol=1e-10)
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, exact_gradient(space, t, probs_fn, oracle_loss), atol=1e-12, rtol=1e-10)


def test_refuses_categorical_and_bad_scores() -> None:
    with pytest.raises(IncompatibleSpaceError, match="BitVector"):
        SparseMAP(Categorical(4))
    estimator = SparseMAP(BitVector(5))
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        estimator(torch.zeros(3, 4, dtype=F64), lambda z, i: z.sum(-1))
    with pytest.raises(ValueError, match="budget"):
        sparsemap(torch.zeros(3, 4, dtype=F64), 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_iter", 0),
        ("max_iter", 2.5),
        ("max_iter", True),
        ("tol", 0.0),
        ("tol", 1.5),
        ("decomposition", "chain"),
        ("precision_bits", 0),
        ("precision_bits", 53),
        ("precision_bits", True),
    ],
)
def test_config_validation_names_the_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SparseMAPConfig(**{field: value})  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


def test_registered_under_sparsemap() -> None:
    assert registry.estimators.load("sparsemap") is SparseMAP


def test_dyadic_planes_are_exact_on_their_grid() -> None:
    """With 4 dyadic bits the marginals are ``round(16 mu) / 16`` exactly, from at most 5 planes with dyadic weights
    (or, where the planes are affinely dependent, exact from the chain)."""
    t = _scores(10, 7, seed=16)
    solution = solve_sparsemap(t, decomposition="dyadic", precision_bits=4)
    mu = sparsemap_marginals(t)
    on_grid = (_marginals(solution) == torch.round(mu * 16) / 16).all(-1)
    exact = (_marginals(solution) - mu).abs().amax(-1) <= 1e-15
    assert bool((on_grid | exact).all()) and int(on_grid.sum()) >= 5
    weights = solution.weights.detach()[on_grid]
    torch.testing.assert_close(weights * 16, torch.round(weights * 16), atol=0, rtol=0)
    assert bool((solution.active[on_grid].sum(-1) <= 5).all())
    for b in range(10):
        lifted = _lift(solution.vertices[b][solution.active[b]])
        assert float(torch.linalg.eigvalsh(lifted @ lifted.T).min()) > 1e-6  # affinely independent


def test_dependent_dyadic_planes_fall_back_to_the_chain() -> None:
    """``mu = (5/8, 3/8)`` has the planes (1,0), (0,1), (1,1), (0,0): four points in the plane, affinely dependent."""
    t = torch.tensor([[0.25, -0.25]], dtype=F64)
    _, weights, gram = _dyadic_decomposition(sparsemap_marginals(t), 3)
    assert int((weights > 0).sum()) == 4
    assert not bool(_affinely_independent(gram, weights > 0)[0])
    solution = solve_sparsemap(t, decomposition="dyadic", precision_bits=3)
    assert int(solution.active.sum()) == 3  # the chain {}, {0}, {0, 1}
    torch.testing.assert_close(_marginals(solution), torch.tensor([[0.625, 0.375]], dtype=F64), atol=1e-15, rtol=0)
    _check_solution(t, solution, None)


@pytest.mark.parametrize("budget", [None, 64])
def test_auto_picks_the_sparser_decomposition(budget: int | None) -> None:
    """Many fractional bits (D = 128, float32): the greedy needs about 25 vertices where the exact decomposition needs
    one per level; D = 4: the exact one wins, and auto returns it."""
    t = (_scores(4, 128, seed=17, scale=0.5)).to(torch.float32)
    auto = solve_sparsemap(t, budget)
    exact = solve_sparsemap(t, budget, decomposition="exact")
    assert bool((auto.active.sum(-1) <= 30).all()) and bool((exact.active.sum(-1) > 90).all())
    recomposed = torch.einsum("bc,bcd->bd", auto.weights.detach().double(), auto.vertices.double())
    error = (recomposed - sparsemap_marginals(t.double(), budget)).abs().max()
    assert float(error) <= 1.5 * 2**-24  # the greedy's 2^-25 truncation + rounding weights summing to 1 to float32
    small = _scores(6, 4, seed=18)
    assert torch.equal(solve_sparsemap(small).active, solve_sparsemap(small, decomposition="exact").active)


@pytest.mark.parametrize(
    ("budget", "decomposition"),  # (digit planes rarely fit a binding budget: no dyadic case with budget 4)
    [(None, "dyadic"), (8, "dyadic"), (None, "greedy"), (8, "greedy"), (4, "greedy")],
)
def test_truncated_backward_equals_explicit_kkt_system(budget: int | None, decomposition: str) -> None:
    """The backward of a dyadic / greedy solution equals ``Z^T x`` with ``[[M, 1], [1^T, 0]] [x; tau] = [g; 0]``."""
    t = _scores(6, 10, seed=19, scale=0.4).requires_grad_(True)
    solution = solve_sparsemap(t, budget, decomposition=decomposition, precision_bits=6)
    assert bool((solution.active.sum(-1) <= 9).all())  # the truncated vertices were used, not the 11 exact ones
    cotangent = torch.randn(solution.weights.shape, generator=torch.Generator().manual_seed(20), dtype=F64)
    (gradient,) = torch.autograd.grad((solution.weights * cotangent).sum(), t)
    for b in range(6):
        vertices = solution.vertices[b][solution.active[b]]
        lifted = _lift(vertices)
        size = vertices.shape[0]
        kkt = torch.zeros(size + 1, size + 1, dtype=F64)
        kkt[:size, :size] = lifted @ lifted.T
        kkt[:size, size] = kkt[size, :size] = 1
        rhs = torch.cat([cotangent[b][solution.active[b]], torch.zeros(1, dtype=F64)])
        reference = torch.linalg.solve(kkt, rhs)[:size] @ vertices
        torch.testing.assert_close(gradient[b], reference, atol=1e-12, rtol=1e-10)
    assert float(gradient.abs().max()) > 0.01


@pytest.mark.parametrize("budget", [2, 3, 5])
def test_structured_systematic_backward_equals_dense_kkt_solve(budget: int) -> None:
    """The O(D) backward of systematic sampling equals the dense KKT solve wherever it claims to apply."""
    t = torch.cat([_scores(40, 7, seed=22, scale=0.6), _degenerate_scores(40, 7, seed=23)])
    solution = solve_sparsemap(t, budget, decomposition="exact")
    weights = solution.weights.detach()
    mu = sparsemap_marginals(t, budget)
    binding = ((t + 1) / 2).clamp(0, 1).sum(-1, keepdim=True) > budget
    _, _, crossings = _systematic_decomposition(mu, budget, binding)
    assert bool(crossings.path[:40].all()) and not bool(crossings.path.all())  # ties exercise the dense fallback
    cotangent = torch.randn(weights.shape, generator=torch.Generator().manual_seed(24), dtype=F64)
    gradients = []
    for structured in (True, False):
        used = crossings if structured else crossings._replace(path=torch.zeros_like(crossings.path))
        leaf = t.clone().requires_grad_(True)
        out = _KKTWeights.apply(
            leaf, solution.vertices, solution.active, weights, torch.zeros(80, dtype=torch.bool), used, 8
        )
        gradients.append(torch.autograd.grad((out * cotangent).sum(), leaf)[0])
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-12, rtol=1e-10)
    assert float(gradients[0].abs().max()) > 0.1
    direct = _path_kkt_direction(crossings, cotangent * solution.active)
    assert bool((direct[~crossings.path] == 0).all())
