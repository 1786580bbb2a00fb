"""Sparse marginalization vs the naive "union" way (the structured solvers are in ``test_bench_solvers.py``).

*Union* evaluates every category that has mass anywhere in the batch on the **whole** batch (what a batched
implementation without per-example row gathering does); lvzoo gathers only the per-example support rows, so its cost
scales with the summed per-example support. Both are measured in a peaked regime (support ~1-2 per example).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from entmax import sparsemax

from lvzoo.estimators import Categorical
from lvzoo.estimators.marginal import SparsemaxMarginal

from .common import MLPDecoderLoss, timed


def _peaked_scores(batch: int, classes: int, device: torch.device) -> torch.Tensor:
    """Scores whose sparsemax support is 1-2 per example, on a different class for each example."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, classes, generator=g) * 0.02
    scores[torch.arange(batch), torch.randint(classes, (batch,), generator=g)] += 1.2
    return scores.to(device).requires_grad_(True)


def _union_step(scores: torch.Tensor, decoder: MLPDecoderLoss) -> None:
    probs = sparsemax(scores, dim=-1)
    batch, classes = probs.shape
    used = torch.nonzero((probs > 0).any(0)).squeeze(1)
    eye = torch.eye(classes, device=scores.device)
    rows = eye[used].repeat_interleave(batch, 0)
    index = torch.arange(batch, device=scores.device).repeat(used.numel())
    losses = decoder(rows, index).reshape(used.numel(), batch).T
    (probs[:, used] * losses).sum().backward()


@pytest.mark.parametrize("classes", [10, 256])
@pytest.mark.parametrize("method", ["lvzoo-sparse", "union"])
def test_sparse_vs_union(benchmark: Any, device: torch.device, classes: int, method: str) -> None:
    batch = 64
    scores = _peaked_scores(batch, classes, device)
    decoder = MLPDecoderLoss(classes, batch).to(device)
    estimator = SparsemaxMarginal(Categorical(classes))

    def sparse_step() -> None:
        estimator(scores, decoder).surrogate.sum().backward()

    step = sparse_step if method == "lvzoo-sparse" else lambda: _union_step(scores, decoder)
    step()
    decoder.rows = 0
    benchmark.group = f"sparse-vs-union-K{classes}-B{batch}"
    benchmark(timed(step, device))
    support = (sparsemax(scores.detach(), dim=-1) > 0).sum(-1).float()
    benchmark.extra_info["support_mean"] = float(support.mean())
    rounds = benchmark.stats.stats.rounds if benchmark.stats is not None else 1  # None with --benchmark-disable
    benchmark.extra_info["decoder_rows_per_step"] = decoder.rows / max(1, rounds)
    assert float(support.mean()) <= 2.0  # the peaked regime this benchmark is about

