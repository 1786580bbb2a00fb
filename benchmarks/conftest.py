"""Shared benchmark options: ``--bench-size fast`` (CI, default) or ``full`` (the paper's sizes), the device, and
quick timing defaults in fast mode.

In fast mode, unless given on the command line, pytest-benchmark runs at most ``FAST_MAX_TIME`` seconds and at
least ``FAST_MIN_ROUNDS`` timed rounds per benchmark (its own defaults, 1 s and 5 rounds, apply with
``--bench-size full``) and each benchmark uses one torch thread (``--bench-threads``), so the whole folder takes
well under two minutes on a laptop CPU.

The task benchmarks read MNIST / Fashion-MNIST from the runner's data search path; where the files are missing
(and cannot be downloaded) they use generated images of the same shapes, which time the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lvzoo.tasks.data import DataNotFoundError, find_root
from tests.datasets import write_random_datasets

FAST_MAX_TIME = 0.25
FAST_MIN_ROUNDS = 2
#: (train, test) images per generated dataset when the real ones are missing (Fashion-MNIST needs > 5,000 train).
GENERATED_IMAGES = (6000, 200)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-size",
        choices=("fast", "full"),
        default="fast",
        help="benchmark sizes: fast (CI, small sizes) or full (paper sizes)",
    )
    parser.addoption("--bench-device", default="cpu", help="device to benchmark on (cpu or cuda)")
    parser.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch CPU threads during each benchmark (default: 1 with --bench-size fast, torch's own with full)",
    )


def _given(config: pytest.Config, flag: str) -> bool:
    return any(str(arg).split("=")[0] == flag for arg in config.invocation_params.args)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Quick pytest-benchmark defaults in fast mode (before pytest-benchmark reads its options)."""
    if config.getoption("--bench-size", default="fast") != "fast" or not hasattr(config.option, "benchmark_max_time"):
        return
    if not _given(config, "--benchmark-max-time"):
        config.option.benchmark_max_time = FAST_MAX_TIME
    if not _given(config, "--benchmark-min-rounds"):
        config.option.benchmark_min_rounds = FAST_MIN_ROUNDS


@pytest.fixture(autouse=True)
def bench_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run each benchmark with ``--bench-threads`` torch CPU threads (restored afterwards).

    Fast mode defaults to one thread: on a shared machine, idle-spinning or descheduled worker threads make
    multi-threaded CPU timings vary several-fold from round to round.
    """
    threads = request.config.getoption("--bench-threads")
    if threads is None:
        threads = 1 if request.config.getoption("--bench-size") == "fast" else torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(previous)


@pytest.fixture
def bench_size(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--bench-size"))


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(str(request.config.getoption("--bench-device")))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """``None`` (the runner's search path) when MNIST and Fashion-MNIST are found there, else a generated root."""
    try:
        for name in ("MNIST", "FashionMNIST"):
            find_root(name, None, download=False)
        return None
    except DataNotFoundError:
        pass
    root = tmp_path_factory.mktemp("bench-data")
    write_random_datasets(root, {"MNIST": GENERATED_IMAGES, "FashionMNIST": GENERATED_IMAGES})
    return root
