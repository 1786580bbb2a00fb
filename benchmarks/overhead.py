"""Estimator overhead of the real training step: ``python -m benchmarks.overhead --task bitvec ...``.

For every task and every compatible registered estimator (or those named with ``--estimator``) the script builds the
real task model with a small training set (``--train-limit``), takes one training batch and times, interleaved
round by round, three versions of one training step (``task.train_step`` + backward, no optimizer update):

- ``step``: the real step with the estimator;
- ``encoder``: the same step with a probe estimator that evaluates no decoder row (encoder, the task's per-batch
  work such as a labelled loss, and the backward pass through them);
- ``rows``: the same step with a probe that evaluates exactly the ``R`` rows the estimator asked for (recorded
  from a real call) once, with no estimator work: the encoder cost plus ``R`` decoder rows forward and backward.

Times are CPU time of the process on the CPU (robust to a shared machine), wall time on CUDA.
``ratio = step / rows``; the estimator's overhead is ``ratio - 1`` (the project's target: at most 10%).
``decoder`` is ``rows - encoder`` and ``per row`` is ``decoder / R``. Times are the minimum over ``--rounds``.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from pathlib import Path
from typing import Any

import attrs
import torch

from lvzoo import registry

from .common import (
    EncoderOnly,
    ReplayRows,
    build_task_setup,
    compatible_estimators,
    interleaved_times,
    record_rows,
    train_step_fn,
)

#: The project's target: a step costs at most this much more than its decoder rows plus the encoder.
TARGET_OVERHEAD = 0.10


@attrs.frozen
class OverheadRow:
    """Measured times (seconds) of one (task, estimator) pair; see the module docstring."""

    task: str
    estimator: str
    examples: int
    rows: int
    step: float
    encoder: float
    rows_step: float
    step_median: float
    rows_step_median: float

    @property
    def ratio(self) -> float:
        return self.step / self.rows_step

    @property
    def median_ratio(self) -> float:
        return self.step_median / self.rows_step_median

    def line(self) -> str:
        decoder = max(self.rows_step - self.encoder, 0.0)
        flag = "  <-- over target" if self.ratio > 1 + TARGET_OVERHEAD else ""
        return (
            f"{self.task:8s} {self.estimator:11s} {self.examples:4d} {self.rows:6d} {self.step * 1e3:9.2f} "
            f"{self.encoder * 1e3:9.2f} {decoder * 1e3:9.2f} {decoder / self.rows * 1e6:9.1f} "
            f"{self.rows_step * 1e3:9.2f} {self.ratio:6.3f} {self.median_ratio:6.3f}{flag}"
        )


HEADER = (
    f"{'task':8s} {'estimator':11s} {'B':>4s} {'R':>6s} {'step ms':>9s} {'enc ms':>9s} {'dec ms':>9s} "
    f"{'us/row':>9s} {'bound ms':>9s} {'ratio':>6s} {'median':>6s}"
)


def measure(
    task: str,
    estimator: str,
    overrides: dict[str, Any],
    device: torch.device,
    rounds: int,
    data_dir: Path | None,
) -> OverheadRow:
    """Time the three step versions of the module docstring for one (task, estimator) pair."""
    setup = build_task_setup(task, estimator, overrides, device, data_dir)
    recorded = record_rows(setup)
    space = setup.estimator.space
    times = interleaved_times(
        {
            "step": train_step_fn(setup),
            "encoder": train_step_fn(setup, EncoderOnly(space).to(device)),
            "rows": train_step_fn(setup, ReplayRows(space, recorded).to(device)),
        },
        rounds,
        device,
    )
    return OverheadRow(
        task=task,
        estimator=estimator,
        examples=recorded.num_examples,
        rows=recorded.z_rows.shape[0],
        step=min(times["step"]),
        encoder=min(times["encoder"]),
        rows_step=min(times["rows"]),
        step_median=statistics.median(times["step"]),
        rows_step_median=statistics.median(times["rows"]),
    )


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", action="append", choices=registry.tasks.names(), help="task (repeatable; all)")
    parser.add_argument("--estimator", action="append", help="estimator (repeatable; default: all compatible)")
    parser.add_argument("--set", action="append", type=_parse_override, default=[], metavar="KEY=VALUE",
                        help="task config override, e.g. --set bits=128 (repeatable)")
    parser.add_argument("--train-limit", type=int, default=256, help="training examples loaded (default 256)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per step version (default 7)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data-dir", type=Path, help="data root (default: the runner's search path)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides: dict[str, Any] = {"train_limit": args.train_limit, **dict(args.set)}
    print(f"device {device}, threads {torch.get_num_threads()}, overrides {overrides}, rounds {args.rounds}")
    print(HEADER)
    worst = 0.0
    for task in args.task or registry.tasks.names():
        task_cls = registry.tasks.load(task)
        space = task_cls(task_cls.config_class(**overrides), args.data_dir, device).latent_space()
        names = args.estimator or compatible_estimators(space)
        for name in names:
            row = measure(task, name, overrides, device, args.rounds, args.data_dir)
            worst = max(worst, row.ratio)
            print(row.line(), flush=True)
    print(f"worst ratio {worst:.3f} (target <= {1 + TARGET_OVERHEAD:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
