"""Step time of every registered estimator (forward + backward through a 784-pixel MLP decoder).

Only the (space, estimator) pairs of the selected ``--bench-size`` whose estimator supports the space are
generated. Groups are ``estimator-step-<space>-B<batch>``; ``extra_info`` records the decoder rows evaluated per
step and per example and the peak memory (CUDA allocated or process RSS). Run
``pytest benchmarks/ --bench-size full --benchmark-autosave`` and compare with ``--benchmark-compare``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lvzoo import registry
from lvzoo.estimators import BitVector, Categorical, LatentSpace

from .common import (
    INPUT_DIM,
    MLPDecoderLoss,
    compatible_estimators,
    memory_kind,
    peak_memory_mb,
    reset_peak_memory,
    space_id,
    timed,
)

#: (space, batch) per benchmark size.
SPACES: dict[str, list[tuple[LatentSpace, int]]] = {
    "fast": [(Categorical(10), 64), (BitVector(32), 64)],
    "full": [
        (Categorical(10), 64),
        (Categorical(256), 64),
        (BitVector(32), 64),
        (BitVector(128), 16),
        (BitVector(128, 64), 16),
    ],
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "estimator_name" not in metafunc.fixturenames:
        return
    size = str(metafunc.config.getoption("--bench-size"))
    cases = [(space, batch, name) for space, batch in SPACES[size] for name in compatible_estimators(space)]
    metafunc.parametrize(
        ("space", "batch", "estimator_name"),
        cases,
        ids=[f"{space_id(space)}-B{batch}-{name}" for space, batch, name in cases],
    )


def test_estimator_step(
    benchmark: Any, device: torch.device, estimator_name: str, space: LatentSpace, batch: int
) -> None:
    estimator: nn.Module = registry.estimators.load(estimator_name)(space).to(device)
    torch.manual_seed(0)
    encoder = nn.Linear(INPUT_DIM, space.size).to(device)
    inputs = torch.rand(batch, INPUT_DIM, device=device)
    decoder = MLPDecoderLoss(space.size, batch).to(device)
    estimator.train()

    steps = [0]

    def step() -> None:
        steps[0] += 1
        encoder.zero_grad(set_to_none=True)
        decoder.zero_grad(set_to_none=True)
        result = estimator(encoder(inputs) * 3.0, decoder, inputs)
        (result.surrogate.mean() - 0.1 * result.entropy.mean()).backward()

    step()  # warm-up (lazy init, allocator)
    decoder.rows = 0
    steps[0] = 0
    reset_peak_memory(device)
    benchmark.group = f"estimator-step-{space_id(space)}-B{batch}"
    benchmark(timed(step, device))
    benchmark.extra_info["decoder_rows_per_step"] = decoder.rows / steps[0]
    benchmark.extra_info["decoder_rows_per_example"] = decoder.rows / steps[0] / batch
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(device)
    benchmark.extra_info["peak_memory_kind"] = memory_kind(device)
    assert decoder.rows > 0
