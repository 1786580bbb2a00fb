"""Helpers shared by the benchmarks and :mod:`benchmarks.overhead`: a realistic per-row decoder loss, device-aware
timing and peak memory, the registered estimators compatible with a latent space, and the real task models.

Shapes: ``B`` examples, ``N`` latent width, ``R`` decoder rows of one step.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from lvzoo import registry
from lvzoo.estimators.base import (
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    IncompatibleSpaceError,
    LossFn,
    evaluate_rows,
    segment_sum,
)
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from lvzoo.tasks.base import Task, TaskConfig, resolve_config

#: Width of the encoder input given to estimators built outside a task (learned baselines need it).
INPUT_DIM = 784
_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


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


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator statistics, or the process's peak RSS (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_CLEAR_REFS.exists():
        with contextlib.suppress(OSError):
            _PROC_CLEAR_REFS.write_text("5")  # resets VmHWM, the peak resident set size


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB since :func:`reset_peak_memory`: allocated CUDA memory, or the process's peak RSS on
    the CPU (``VmHWM``; the whole process's lifetime peak where it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_kind(device: torch.device) -> str:
    """What :func:`peak_memory_mb` measures on ``device``."""
    return "cuda_max_allocated" if device.type == "cuda" else "peak_rss"


def space_id(space: LatentSpace) -> str:
    """A short name: ``K10``, ``D32``, ``D32b16`` (budget 16)."""
    if isinstance(space, Categorical):
        return f"K{space.K}"
    return f"D{space.D}" if space.budget is None else f"D{space.D}b{space.budget}"


@functools.cache
def estimator_compatible(name: str, space: LatentSpace) -> bool:
    """Whether the registered estimator ``name`` accepts ``space``: its ``supported_spaces`` list the space's type
    and its constructor does not refuse the space (e.g. sampling estimators refuse budgeted bit vectors)."""
    estimator_cls = registry.estimators.load(name)
    if not isinstance(space, estimator_cls.supported_spaces):
        return False
    try:
        estimator_cls(space)
    except IncompatibleSpaceError:
        return False
    return True


def compatible_estimators(space: LatentSpace) -> list[str]:
    """The registered estimator names compatible with ``space`` (sorted)."""
    return [name for name in registry.estimators.names() if estimator_compatible(name, space)]


# ---------------------------------------------------------------------------------------------------------------
# Real task models


@attrs.frozen
class TaskCase:
    """A task configured for benchmarking: registry name, a label for the size, config overrides."""

    task: str
    size: str
    overrides: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def label(self) -> str:
        extra = "".join(f"-{key}{value}" for key, value in sorted(self.overrides.items()) if key != "train_limit")
        return f"{self.task}-{self.size}{extra}"


@attrs.frozen
class TaskSetup:
    """A built task, its model and estimator (training mode, on ``device``) and one fixed training batch."""

    task: Task[Any]
    model: nn.Module
    estimator: Estimator[Any]
    batch: Any
    device: torch.device


#: Tasks built once per (task, config, device) and whose lazily loaded data is lent to later setups.
_DATA_DONORS: dict[tuple[str, TaskConfig, str], Task[Any]] = {}


def _share_loaded_data(donor: Task[Any], task: Task[Any]) -> None:
    """Lend ``donor``'s lazily loaded data to a fresh ``task`` of the same config (only attributes that are
    ``None`` on the fresh task and set on the donor: the data caches), so each dataset is read once."""
    for key, value in vars(donor).items():
        if value is not None and key in vars(task) and vars(task)[key] is None:
            setattr(task, key, value)


def build_task_setup(
    task_name: str,
    estimator_name: str,
    overrides: Mapping[str, Any],
    device: torch.device,
    data_dir: Path | None = None,
    seed: int = 0,
) -> TaskSetup:
    """The task ``task_name`` with config ``overrides``, its model and the paper's configuration of
    ``estimator_name`` for it (as the runner resolves them), seeded with ``seed``, and the first training batch.

    Datasets are loaded once per (task, config, device) and shared by the setups of every estimator.
    """
    task_cls = registry.tasks.load(task_name)
    config, paper_estimator = resolve_config(task_cls, estimator_name, overrides)
    donor_key = (task_name, task_cls.config_class(**overrides), str(device))  # the data depends on these only
    torch.manual_seed(seed)
    task: Task[Any] = task_cls(config, data_dir, device)
    if donor_key in _DATA_DONORS:
        _share_loaded_data(_DATA_DONORS[donor_key], task)
    estimator_cls = registry.estimators.load(estimator_name)
    estimator_config = estimator_cls.config_class(**paper_estimator)
    model = task.build_model().to(device)
    estimator = estimator_cls(task.latent_space(), estimator_config).to(device)
    model.train()
    estimator.train()
    batch = next(iter(task.train_batches(torch.Generator().manual_seed(seed))))
    _DATA_DONORS.setdefault(donor_key, task)
    return TaskSetup(task=task, model=model, estimator=estimator, batch=batch, device=device)


def train_step_fn(setup: TaskSetup, estimator: Estimator[Any] | None = None) -> Callable[[], Tensor]:
    """One training step of ``setup`` (``task.train_step`` and the backward pass, no optimizer update, so every
    call sees the same parameters); ``estimator`` replaces the setup's own. Returns the detached loss."""
    parameters = [*setup.model.parameters(), *setup.estimator.parameters()]
    used = setup.estimator if estimator is None else estimator

    def step() -> Tensor:
        for parameter in parameters:
            parameter.grad = None
        out = setup.task.train_step(setup.model, used, setup.batch)
        torch.autograd.backward(out.loss)
        return out.loss.detach()

    return step


# ---------------------------------------------------------------------------------------------------------------
# Probe estimators: the same task step with the estimator's own work removed


@attrs.frozen
class ProbeConfig(EstimatorConfig):
    """The probe estimators have no hyper-parameters."""


@attrs.frozen
class RecordedRows:
    """The decoder rows of one estimator call on ``num_examples`` examples: ``z_rows [R, N]`` (detached),
    ``example_index [R]``, whether the estimator passed rows that require a gradient (relaxed samples) and the
    rows' categories where it declared them one-hot (see :func:`~lvzoo.estimators.base.evaluate_rows`)."""

    z_rows: Tensor
    example_index: Tensor
    requires_grad: bool
    num_examples: int
    categories: Tensor | None = None


def _zero_result(scores: Tensor, surrogate: Tensor) -> EstimatorResult:
    zero = scores.sum(-1) * 0.0  # keeps the encoder in the graph: its backward pass is part of the encoder cost
    return EstimatorResult(
        surrogate=surrogate + zero,
        objective=surrogate.detach(),
        entropy=zero,
        support=torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device),
    )


class EncoderOnly(Estimator[ProbeConfig]):
    """Probe: evaluates no decoder row; its step costs the encoder and the task's own per-batch work only."""

    config_class: ClassVar[type[EstimatorConfig]] = ProbeConfig

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        return _zero_result(scores, scores.new_zeros(scores.shape[0]))


class ReplayRows(Estimator[ProbeConfig]):
    """Probe: evaluates exactly the recorded rows once (one loss call) and sums their losses per example; its
    step costs the encoder plus ``R`` decoder rows forward and backward, with no estimator work."""

    config_class: ClassVar[type[EstimatorConfig]] = ProbeConfig

    def __init__(self, space: LatentSpace, rows: RecordedRows) -> None:
        super().__init__(space)
        self.rows = rows

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        z_rows = self.rows.z_rows.clone().requires_grad_(self.rows.requires_grad)
        losses = evaluate_rows(loss_fn, z_rows, self.rows.example_index, self.rows.categories)
        return _zero_result(scores, segment_sum(losses, self.rows.example_index, scores.shape[0]))


class RowRecorder(Estimator[ProbeConfig]):
    """Wraps an estimator and records the rows of its (single) loss call in :attr:`calls`."""

    config_class: ClassVar[type[EstimatorConfig]] = ProbeConfig
    supported_spaces = (Categorical, BitVector)

    def __init__(self, inner: Estimator[Any]) -> None:
        super().__init__(inner.space)
        self.inner = inner
        self.calls: list[RecordedRows] = []

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        return self.inner(scores, _RecordingLoss(loss_fn, self.calls, scores), encoder_input)


class _RecordingLoss:
    """A loss that appends each call's rows to ``calls`` and forwards it (``of_categories`` too, where it exists).

    ``scores [B, N]`` give the number of examples and the width and dtype of one-hot rows."""

    def __init__(self, loss_fn: LossFn, calls: list[RecordedRows], scores: Tensor) -> None:
        self.loss_fn, self.calls, self.scores = loss_fn, calls, scores
        self.num_examples = scores.shape[0]

    def __call__(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        self.calls.append(RecordedRows(z_rows.detach().clone(), example_index, z_rows.requires_grad, self.num_examples))
        return self.loss_fn(z_rows, example_index)

    def of_categories(self, categories: Tensor, example_index: Tensor) -> Tensor:
        eye = torch.eye(self.scores.shape[1], dtype=self.scores.dtype, device=categories.device)
        rows = RecordedRows(eye[categories], example_index, False, self.num_examples, categories)
        self.calls.append(rows)
        return evaluate_rows(self.loss_fn, rows.z_rows, example_index, categories)


def record_rows(setup: TaskSetup) -> RecordedRows:
    """The rows of one real training step of ``setup`` (exactly one loss call is expected)."""
    recorder = RowRecorder(setup.estimator)
    train_step_fn(setup, recorder)()
    if len(recorder.calls) != 1:
        raise RuntimeError(
            f"{type(setup.estimator).__name__} called its loss {len(recorder.calls)} times in one step; expected 1"
        )
    return recorder.calls[0]


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock for step timings: CPU time of the process on the CPU (``time.process_time``: unaffected by other
    processes taking turns on a shared machine), wall time on an accelerator (after a synchronisation)."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Times in seconds (:func:`step_clock`) of ``rounds`` calls of each function, interleaved round by round (so a
    change of machine load affects all alike), after one untimed warm-up call each."""
    clock = step_clock(device)
    for fn in fns.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            synchronize(device)
            times[name].append(clock() - start)
    return times
