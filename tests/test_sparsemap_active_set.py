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
