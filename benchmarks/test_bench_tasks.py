"""Step time of the real training step of every task with every compatible estimator.

One case per (task size, estimator): the task's own model, the paper's estimator configuration for the task and
one fixed training batch; a round is ``task.train_step`` + backward (no optimizer update). Only compatible pairs
are generated (registry + ``supported_spaces`` + the estimator's own refusal, e.g. of budgeted bit vectors).

Sizes: ``fast`` (CI) uses tiny data limits and batches of ``FAST_BATCH``; ``--bench-size full`` uses the paper's
batch sizes and both bit-vector widths (and the budgeted SparseMAP variant). Groups are ``task-<task>-<size>``;
``extra_info`` holds the decoder rows per step and per example, the peak memory (CUDA allocated or process RSS)
and the batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lvzoo import registry

from .common import (
    TaskCase,
    build_task_setup,
    compatible_estimators,
    memory_kind,
    peak_memory_mb,
    record_rows,
    reset_peak_memory,
    timed,
    train_step_fn,
)

FAST_BATCH = 16
FAST_LIMIT = {"train_limit": 64, "eval_limit": 16, "batch_size": FAST_BATCH}

CASES: dict[str, list[TaskCase]] = {
    "fast": [
        TaskCase("ssvae", "fast", FAST_LIMIT),
        TaskCase("signal", "fast", FAST_LIMIT),
        TaskCase("bitvec", "fast", FAST_LIMIT),
    ],
    "full": [
        TaskCase("ssvae", "full"),
        TaskCase("signal", "full"),
        TaskCase("bitvec", "full-D32", {"bits": 32}),
        TaskCase("bitvec", "full-D128", {"bits": 128}),
        TaskCase("bitvec", "full-D128b64", {"bits": 128, "budget": 64}),
    ],
}


def _space_of(case: TaskCase) -> Any:
    task_cls = registry.tasks.load(case.task)
    return task_cls(task_cls.config_class(**case.overrides), None, torch.device("cpu")).latent_space()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "task_case" not in metafunc.fixturenames:
        return
    size = str(metafunc.config.getoption("--bench-size"))
    pairs = [(case, name) for case in CASES[size] for name in compatible_estimators(_space_of(case))]
    metafunc.parametrize(
        ("task_case", "estimator_name"), pairs, ids=[f"{case.task}-{case.size}-{name}" for case, name in pairs]
    )


def test_task_step(
    benchmark: Any, device: torch.device, data_dir: Path | None, task_case: TaskCase, estimator_name: str
) -> None:
    setup = build_task_setup(task_case.task, estimator_name, task_case.overrides, device, data_dir)
    rows = record_rows(setup)  # also the warm-up step
    reset_peak_memory(device)
    benchmark.group = f"task-{task_case.task}-{task_case.size}"
    loss = benchmark(timed(train_step_fn(setup), device))
    benchmark.extra_info["decoder_rows_per_step"] = rows.z_rows.shape[0]
    benchmark.extra_info["decoder_rows_per_example"] = rows.z_rows.shape[0] / rows.num_examples
    benchmark.extra_info["batch_size"] = rows.num_examples
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(device)
    benchmark.extra_info["peak_memory_kind"] = memory_kind(device)
    assert rows.z_rows.shape[0] >= rows.num_examples > 0
    assert bool(torch.isfinite(loss))
