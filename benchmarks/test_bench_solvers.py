"""The structured solvers on their own: batched SparseMAP (forward + backward) and the exact k-best bit-vector search.

Scores are float32 ``N(0, 1)`` (a realistic encoder output). ``--bench-size fast`` (default) runs D = 32; ``full``
adds the paper's D = 128 sizes. ``extra_info["support_mean"]`` is the mean number of decoder rows per example the
solver returns. Compare thread counts with ``--bench-threads``, e.g.
``pytest benchmarks/test_bench_solvers.py --bench-size full --bench-threads 1 --benchmark-columns=min,median``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lvzoo.estimators.sparsemap import solve_sparsemap
from lvzoo.estimators.topk import kbest_bitvectors

from .common import timed

# (batch, bits, budget, sizes in which it runs)
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


def _scores(batch: int, bits: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, bits, generator=torch.Generator().manual_seed(0)).to(device)


def _case_id(batch: int, bits: int, budget: int | None) -> str:
    return f"B{batch}-D{bits}" + ("" if budget is None else f"-budget{budget}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Generate only the cases of the selected ``--bench-size`` (no skipped cases)."""
    if "bits" not in metafunc.fixturenames:
        return
    size = str(metafunc.config.getoption("--bench-size"))
    table = SPARSEMAP_CASES if metafunc.function.__name__ == "test_sparsemap_forward_backward" else TOPK_CASES
    cases = [case[:3] for case in table if size in case[3]]
    metafunc.parametrize(("batch", "bits", "budget"), cases, ids=[_case_id(*case) for case in cases])


@pytest.mark.parametrize("decomposition", ["auto", "exact"])
def test_sparsemap_forward_backward(
    benchmark: Any,
    device: torch.device,
    batch: int,
    bits: int,
    budget: int | None,
    decomposition: str,
) -> None:
    scores = _scores(batch, bits, device)
    supports: list[float] = []

    def step() -> None:
        leaf = scores.clone().requires_grad_(True)
        solution = solve_sparsemap(leaf, budget, decomposition=decomposition)
        slot_weights = torch.arange(solution.weights.shape[1], device=device, dtype=scores.dtype)
        (solution.weights * slot_weights).sum().backward()  # type: ignore[no-untyped-call]
        supports.append(float(solution.active.sum(-1).float().mean()))

    step()
    benchmark.group = f"sparsemap-{_case_id(batch, bits, budget)}"
    benchmark(timed(step, device))
    benchmark.extra_info["support_mean"] = supports[-1]
    assert 1 <= supports[-1] <= bits + 1


def test_topk_search(benchmark: Any, device: torch.device, batch: int, bits: int, budget: int | None) -> None:
    k = 10
    scores = _scores(batch, bits, device)
    benchmark.group = f"topk-search-k{k}"
    z, _ = benchmark(timed(lambda: kbest_bitvectors(scores, k, budget), device))
    benchmark.extra_info["support_mean"] = float(k)
    assert z.shape == (batch, k, bits)
    if budget is not None:
        assert bool((z.sum(-1) <= budget).all())
