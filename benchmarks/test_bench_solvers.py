"""The structured solvers on their own: batched SparseMAP (forward + backward) and the exact k-best bit-vector search.

Scores are float32 ``N(0, s^2)`` (a realistic encoder output); SparseMAP runs at three scales ``s`` (:data:`SCALES`:
flat, normal, peaked) with every decomposition (``"auto"`` is the default). ``--bench-size fast``
(default) runs D = 32; ``full`` adds the paper's D = 128 sizes. ``extra_info["support_mean"]`` is the mean number
of decoder rows per example the solver returns (``support_max`` the largest, ``iterations`` the active-set
iterations). Compare thread counts with ``--bench-threads``, e.g.
``pytest benchmarks/test_bench_solvers.py --bench-size full --bench-threads 1 --benchmark-columns=min,median``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lvzoo.estimators.sparsemap import SparseMAPSolution, solve_sparsemap
from lvzoo.estimators.topk import kbest_bitvectors

from .common import timed

#: Score scales of the SparseMAP regimes: flat scores leave most bits fractional, peaked ones clip most of them.
SCALES = {"flat": 0.25, "normal": 1.0, "peaked": 4.0}
# (batch, bits, budget, sizes in which it runs); every SparseMAP case runs at each of SCALES
SPARSEMAP_CASES = [
    (64, 32, None, ("fast", "full")),
    (64, 32, 16, ("fast", "full")),
    (16, 128, None, ("full",)),
    (16, 128, 64, ("full",)),
]
TOPK_CASES = [
    (64, 32, None, ("fast", "full")),
    (64, 32, 16, ("fast", "full")),
    (64, 128, None, ("full",)),
    (64, 128, 64, ("full",)),
]


def _scores(batch: int, bits: int, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(batch, bits, generator=torch.Generator().manual_seed(0))).to(device)


def _case_id(batch: int, bits: int, budget: int | None) -> str:
    return f"B{batch}-D{bits}" + ("" if budget is None else f"-budget{budget}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Generate only the cases of the selected ``--bench-size`` (no skipped cases)."""
    if "bits" not in metafunc.fixturenames:
        return
    size = str(metafunc.config.getoption("--bench-size"))
    if metafunc.function.__name__ == "test_sparsemap_forward_backward":
        regimes = [(*case[:3], scale) for case in SPARSEMAP_CASES if size in case[3] for scale in SCALES]
        ids = [f"{_case_id(batch, bits, budget)}-{scale}" for batch, bits, budget, scale in regimes]
        metafunc.parametrize(("batch", "bits", "budget", "scale"), regimes, ids=ids)
        return
    cases = [case[:3] for case in TOPK_CASES if size in case[3]]
    metafunc.parametrize(("batch", "bits", "budget"), cases, ids=[_case_id(*case) for case in cases])


@pytest.mark.parametrize("decomposition", ["auto", "greedy", "dyadic", "exact", "active_set"])
def test_sparsemap_forward_backward(
    benchmark: Any,
    device: torch.device,
    batch: int,
    bits: int,
    budget: int | None,
    scale: str,
    decomposition: str,
) -> None:
    """One solve and its backward; ``extra_info`` records the vertices per example (mean and max: the decoder rows
    the solver asks for) and the active-set iterations."""
    scores = _scores(batch, bits, device, SCALES[scale])
    solutions: list[SparseMAPSolution] = []

    def step() -> None:
        leaf = scores.clone().requires_grad_(True)
        solution = solve_sparsemap(leaf, budget, decomposition=decomposition)
        slot_weights = torch.arange(solution.weights.shape[1], device=device, dtype=scores.dtype)
        (solution.weights * slot_weights).sum().backward()  # type: ignore[no-untyped-call]
        solutions[:] = [solution]

    step()
    benchmark.group = f"sparsemap-{_case_id(batch, bits, budget)}-{scale}"
    benchmark(timed(step, device))
    support = solutions[0].active.sum(-1).float()
    benchmark.extra_info.update(
        support_mean=float(support.mean()),
        support_max=int(support.max()),
        iterations=solutions[0].iterations,
    )
    assert bool(solutions[0].converged.all())
    assert 1 <= float(support.mean()) <= bits + 1


def test_topk_search(benchmark: Any, device: torch.device, batch: int, bits: int, budget: int | None) -> None:
    k = 10
    scores = _scores(batch, bits, device)
    benchmark.group = f"topk-search-k{k}"
    z, _ = benchmark(timed(lambda: kbest_bitvectors(scores, k, budget), device))
    benchmark.extra_info["support_mean"] = float(k)
    assert z.shape == (batch, k, bits)
    if budget is not None:
        assert bool((z.sum(-1) <= budget).all())
