"""Helpers shared by the benchmarks: a realistic per-row decoder loss and device-aware timing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class MLPDecoderLoss(nn.Module):
    """Per-row loss of a VAE-like decoder: ``BCE(MLP(z), x[example_index])`` with 784 outputs; ``[R, N] -> [R]``."""

    def __init__(self, latent_size: int, batch: int, hidden: int = 128, pixels: int = 784, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(latent_size, hidden), nn.ReLU(), nn.Linear(hidden, pixels))
        self.register_buffer("targets", (torch.rand(batch, pixels, generator=g) > 0.5).float())
        self.rows = 0

    def forward(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        self.rows += z_rows.shape[0]
        targets: Tensor = self.targets  # type: ignore[assignment]
        logits = self.net(z_rows)
        return nn.functional.binary_cross_entropy_with_logits(
            logits, targets[example_index], reduction="none"
        ).sum(-1)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """Wrap ``fn`` so each benchmark round ends with a device synchronisation."""

    def run() -> Any:
        out = fn()
        synchronize(device)
        return out

    return run


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated device memory in MiB since the last reset (CUDA only; None on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
