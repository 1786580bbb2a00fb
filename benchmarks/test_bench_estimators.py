"""Step time of every registered estimator (forward + backward through a 784-pixel MLP decoder).

Groups are ``<space>-B<batch>``; ``extra_info`` records the decoder rows evaluated per step and per example and the
peak device memory. Run ``pytest benchmarks/ --bench-size full --benchmark-autosave`` and compare with
``--benchmark-compare``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lvzoo import registry
from lvzoo.estimators import BitVector, Categorical, IncompatibleSpaceError, LatentSpace

from .common import MLPDecoderLoss, peak_memory_mb, timed

# (space, batch, sizes in which it runs)
SPACES: list[tuple[LatentSpace, int, tuple[str, ...]]] = [
    (Categorical(10), 64, ("fast", "full")),
    (Categorical(256), 64, ("full",)),
    (BitVector(32), 64, ("fast", "full")),
    (BitVector(128), 16, ("full",)),
]


def _space_id(space: LatentSpace) -> str:
    return f"K{space.K}" if isinstance(space, Categorical) else f"D{space.D}"


@pytest.mark.parametrize("estimator_name", registry.estimators.names())
@pytest.mark.parametrize("space,batch,sizes", SPACES, ids=[f"{_space_id(s)}-B{b}" for s, b, _ in SPACES])
def test_estimator_step(
    benchmark: Any,
    bench_size: str,
    device: torch.device,
    estimator_name: str,
    space: LatentSpace,
    batch: int,
    sizes: tuple[str, ...],
) -> None:
    if bench_size not in sizes:
        pytest.skip(f"{_space_id(space)} runs with --bench-size {' or '.join(sizes)}")
    estimator_cls = registry.estimators.load(estimator_name)
    try:
        estimator: nn.Module = estimator_cls(space, input_dim=784).to(device)
    except IncompatibleSpaceError:
        pytest.skip(f"{estimator_name} does not support {space!r}")
    torch.manual_seed(0)
    encoder = nn.Linear(784, space.size).to(device)
    inputs = torch.rand(batch, 784, device=device)
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.group = f"estimator-step-{_space_id(space)}-B{batch}"
    benchmark(timed(step, device))
    benchmark.extra_info["decoder_rows_per_step"] = decoder.rows / steps[0]
    benchmark.extra_info["decoder_rows_per_example"] = decoder.rows / steps[0] / batch
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(device)
    assert decoder.rows > 0
