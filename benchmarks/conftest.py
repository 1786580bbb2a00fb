"""Shared benchmark options: ``--bench-size fast`` (CI, default) or ``full`` (the paper's sizes)."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-size",
        choices=("fast", "full"),
        default="fast",
        help="benchmark sizes: fast (CI, one small size per case) or full (paper sizes)",
    )
    parser.addoption("--bench-device", default="cpu", help="device to benchmark on (cpu or cuda)")


@pytest.fixture
def bench_size(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--bench-size"))


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(str(request.config.getoption("--bench-device")))
