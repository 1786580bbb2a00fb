"""The active-set SparseMAP solver's incremental linear algebra and its two execution modes (compacted on CPU,
lockstep on accelerators), against fresh solves and the brute-force KKT certificate of :mod:`tests.test_sparsemap`."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lvzoo.estimators import sparsemap_active_set
from lvzoo.estimators.sparsemap import SparseMAPSolution, sparsemap_marginals
from lvzoo.estimators.sparsemap_active_set import _active_set, _gram, _Working
from tests.test_sparsemap import _check_solution, _degenerate_scores, _scores

F64 = torch.float64


def _solution(t: Tensor, budget: int | None, compact: bool) -> SparseMAPSolution:
    vertices, weights, active, iterations, converged = _active_set(t, budget, 1000, 1e-9, compact=compact)
    return SparseMAPSolution(vertices, weights, active, iterations, converged)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("budget", [None, 2, 3])
def test_both_modes_are_certified_by_brute_force(budget: int | None, compact: bool) -> None:
    t = torch.cat([_scores(10, 6, seed=21), _degenerate_scores(10, 6, seed=22)])
    solution = _solution(t, budget, compact)
    assert bool(solution.converged.all())
    _check_solution(t, solution, budget)


@pytest.mark.parametrize("budget", [None, 12])
def test_both_modes_reach_the_closed_form_marginals(budget: int | None) -> None:
    t = _scores(24, 24, seed=23)
    for compact in (True, False):
        solution = _solution(t, budget, compact)
        assert bool(solution.converged.all())
        marginals = torch.einsum("bc,bcd->bd", solution.weights, solution.vertices)
        torch.testing.assert_close(marginals, sparsemap_marginals(t, budget), atol=1e-8, rtol=0)


def test_tracked_inverse_equals_a_fresh_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refreshing at every iteration, the rank-one-updated inverse is compared with the fresh one each time."""
    drift: list[float] = []
    fresh_refresh = _Working.refresh

    def checked_refresh(work: _Working) -> None:
        tracked = work.inverse.clone()
        fresh_refresh(work)
        drift.append(float((tracked - work.inverse).abs().max() / work.inverse.abs().max()))

    monkeypatch.setattr(sparsemap_active_set, "_REFRESH_EVERY", 1)
    monkeypatch.setattr(_Working, "refresh", checked_refresh)
    for budget in (None, 10):
        _solution(_scores(12, 20, seed=24), budget, compact=True)
    assert len(drift) > 20
    assert max(drift) < 1e-9


def test_inverse_is_zero_outside_the_active_slots_and_inverts_the_gram() -> None:
    t = _scores(6, 12, seed=25)
    work = _Working(t, sparsemap_active_set._map_oracle(t, 5), 13, 1e-9, compact=False)
    for _ in range(6):  # a few add / step rounds by hand
        mu = torch.bmm(work.weights.unsqueeze(1), work.vertices).squeeze(1)
        residual = t + 1 - 2 * mu
        candidate = sparsemap_active_set._map_oracle(residual, 5, work.tie)
        work.done = work.done | (work.stationary & (((candidate - mu) * residual).sum(-1) <= work.threshold))
        work.add(work.stationary & ~work.done, candidate)
        work.step()
    active = work.on > 0
    assert int(active.sum(-1).min()) >= 2
    outside = ~(active.unsqueeze(2) & active.unsqueeze(1))
    assert float(work.inverse[outside].abs().max()) == 0.0
    on = work.on.unsqueeze(2) * work.on.unsqueeze(1)
    identity_on_active = torch.diag_embed(work.on)
    torch.testing.assert_close(torch.bmm(_gram(work.vertices, active) * on, work.inverse), identity_on_active)


def _certified(t: Tensor, budget: int | None, vertices: Tensor, weights: Tensor) -> Tensor:
    """``[B]``: the Frank-Wolfe gap of the returned distribution is within the solver's tolerance (1e-9, relative)."""
    mu = torch.einsum("bc,bcd->bd", weights, vertices)
    residual = t + 1 - 2 * mu
    gap = ((sparsemap_active_set._map_oracle(residual, budget) - mu) * residual).sum(-1)
    return gap <= 1e-9 * t.abs().amax(-1).clamp_min(1) * (1 + 1e-6)


@pytest.mark.parametrize("compact", [True, False])
def test_converged_means_certified_even_when_rounding_stalls_the_solver(compact: bool) -> None:
    """Flat scores at D = 128 with budget 64 (seed 5, one thread): one example's active set becomes nearly dependent.
    Before, the solver declared a stationary point on all D + 1 slots converged without its certificate (marginals
    off by 4.5e-6), and in lockstep the example cycled (add a vertex, drop it) until ``max_iter``. Now every example
    reported converged has its certificate, and the solve ends well before ``max_iter``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the rounding that triggers it is that of one thread
    try:
        t = (0.25 * torch.randn(16, 128, generator=torch.Generator().manual_seed(5))).double()
        vertices, weights, _, iterations, converged = _active_set(t, 64, 1000, 1e-9, compact=compact)
        assert iterations < 500
        assert bool(_certified(t, 64, vertices, weights)[converged].all())
        assert int(converged.sum()) >= 15
        torch.testing.assert_close(weights.sum(-1), torch.ones(16, dtype=F64), atol=1e-12, rtol=0)
        error = (torch.einsum("bc,bcd->bd", weights, vertices) - sparsemap_marginals(t, 64)).abs().amax(-1)
        assert float(error.max()) < 1e-7  # a stalled example still returns a feasible, accurate distribution
        row = _active_set(t[7:8], 64, 1000, 1e-9, compact=compact)
        assert row[3] < 500 and bool(_certified(t[7:8], 64, row[0], row[1])[row[4]].all())
    finally:
        torch.set_num_threads(threads)


def test_a_stuck_example_is_retried_after_a_refresh_then_stalled() -> None:
    t = _scores(3, 6, seed=26)
    work = _Working(t, sparsemap_active_set._map_oracle(t, None), 7, 1e-9, compact=True)
    stuck = torch.tensor([True, False, False])
    work.stall(stuck)
    assert bool(work.refresh_wanted) and work.retried.tolist() == [True, False, False]
    assert not bool(work.stalled.any())
    work.refresh()
    assert not bool(work.refresh_wanted)
    work.stall(stuck)
    assert work.stalled.tolist() == [True, False, False]
