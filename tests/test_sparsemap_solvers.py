"""SparseMAP decompositions across regimes: the default is at least as sparse as the active-set solver everywhere;
the greedy decomposition is valid, exact to its precision, and without a budget never uses more vertices than the
exact one."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lvzoo.estimators.sparsemap import SparseMAPSolution, solve_sparsemap, sparsemap_marginals
from lvzoo.estimators.sparsemap_active_set import _gram
from lvzoo.estimators.sparsemap_decompositions import _affinely_independent
from lvzoo.estimators.sparsemap_greedy import _greedy_decomposition
from tests.test_sparsemap import _degenerate_scores, _scores

F64 = torch.float64
#: (batch, bits, budget) x score scale: the regimes of ``benchmarks/test_bench_solvers.py``.
REGIMES = [
    (batch, bits, budget, scale)
    for batch, bits in ((64, 32), (16, 128))
    for budget in (None, bits // 2)
    for scale in (0.25, 1.0, 4.0)
]


def _float32_scores(batch: int, bits: int, scale: float, seed: int) -> Tensor:
    return scale * torch.randn(batch, bits, generator=torch.Generator().manual_seed(seed))


def _support(solution: SparseMAPSolution) -> float:
    return float(solution.active.sum(-1).double().mean())


@pytest.mark.parametrize(("batch", "bits", "budget", "scale"), REGIMES)
def test_default_is_no_less_sparse_than_the_active_set(batch: int, bits: int, budget: int | None, scale: float) -> None:
    """Float32 ``N(0, s^2)`` scores (seeded): mean vertices per example of ``"auto"`` <= those of the active set
    (tol 1e-9); both reproduce the marginals to float32 precision."""
    t = _float32_scores(batch, bits, scale, seed=0)
    default = solve_sparsemap(t, budget)
    reference = solve_sparsemap(t, budget, decomposition="active_set")
    assert bool(reference.converged.all())
    assert _support(default) <= _support(reference)
    for solution in (default, reference):
        recomposed = torch.einsum("bc,bcd->bd", solution.weights.detach().double(), solution.vertices.double())
        bound = 1.5 * 2**-24  # truncation (2^-25, greedy) + rounding weights that sum to 1 to float32 (2^-24)
        assert float((recomposed - sparsemap_marginals(t.double(), budget)).abs().max()) <= bound
    if bits == 128 and scale <= 1:  # the flat and normal regimes: far sparser than the active set
        assert _support(default) <= 0.65 * _support(reference)


@pytest.mark.parametrize("bits", [4, 8, 20])
@pytest.mark.parametrize("budget", [None, 3, 6])
def test_greedy_is_exact_to_its_precision_and_valid(budget: int | None, bits: int) -> None:
    t = torch.cat([_scores(24, 9, seed=31, scale=0.7), _degenerate_scores(16, 9, seed=32)])
    mu = sparsemap_marginals(t, budget)
    binding = ((t + 1) / 2).clamp(0, 1).sum(-1, keepdim=True) > (budget or 9)
    vertices, weights, valid = _greedy_decomposition(mu, budget, binding, bits)
    assert bool(valid.all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(40, dtype=F64), atol=1e-12, rtol=0)
    assert bool((weights >= 0).all())
    error = (torch.einsum("bs,bsd->bd", weights, vertices.to(F64)) - mu).abs().amax(-1)
    assert float(error.max()) <= 2.0 ** -(bits + 1) + 1e-13
    on = weights > 0
    assert bool(_affinely_independent(_gram(vertices, on), on).all())
    if budget is not None:
        sizes = vertices.sum(-1)
        assert bool((torch.where(binding, sizes == budget, sizes <= budget) | ~on).all())
        assert bool(binding.any()) and bool((~binding).any())  # both cases exercised
    if budget is None:
        assert bool((on.sum(-1) <= bits + 1).all())  # the residual mass halves at every step


def test_greedy_never_needs_more_vertices_than_the_chain() -> None:
    """Without a budget every greedy step fixes a marginal level, so it stops no later than the threshold chain."""
    t = torch.cat([_scores(64, 12, seed=33), _degenerate_scores(64, 12, seed=34), _scores(32, 40, seed=35)[:, :12]])
    mu = sparsemap_marginals(t)
    _, weights, valid = _greedy_decomposition(mu, None, torch.zeros(160, 1, dtype=torch.bool), 40)
    chain = solve_sparsemap(t, decomposition="exact")
    assert bool(valid.all())
    assert bool(((weights > 0).sum(-1) <= chain.active.sum(-1)).all())


def test_lower_precision_buys_sparsity() -> None:
    t = _float32_scores(16, 128, 1.0, seed=36).double()
    supports = [
        _support(solve_sparsemap(t, 64, decomposition="greedy", precision_bits=bits)) for bits in (8, 16, 24, 40)
    ]
    assert supports == sorted(supports) and supports[0] < 12 and supports[-1] < 60


@pytest.mark.parametrize("budget", [1, 32])
def test_systematic_marginals_are_within_one_grid_tick(budget: int) -> None:
    """Near-tied scores at D = 128: the floors' shortfall is spread over the bits with the largest remainders (it
    once went to a single bit, 5e-12 off); each marginal is within one tick of the grid ``2^-(52 - 8)``."""
    t = torch.randint(-3, 4, (6, 128), generator=torch.Generator().manual_seed(37)).double() * 1e-9
    solution = solve_sparsemap(t, budget, decomposition="exact")
    recomposed = torch.einsum("bc,bcd->bd", solution.weights.detach(), solution.vertices)
    assert float((recomposed - sparsemap_marginals(t, budget)).abs().max()) <= 2.0**-44
    assert bool((solution.vertices.sum(-1)[solution.active] == budget).all())  # the budget binds here
