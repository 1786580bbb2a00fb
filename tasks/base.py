"""The task interface the generic runner trains: data, model, per-step loss and evaluation.

A task owns its data splits and its paper defaults; the runner owns the loop, the optimizer, checkpoints and
tracking. Batches are already on the task's device; ``train_step`` and ``evaluate`` never move data to the host
inside the hot path (metrics are returned as tensors and only read once per logging interval).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import Estimator
from lvzoo.estimators.spaces import LatentSpace
from lvzoo.estimators.validators import optional, positive_int, positive_number


@attrs.frozen
class TaskConfig:
    """Hyper-parameters every task has. ``None`` means "the paper's value for the chosen estimator"."""

    batch_size: int | None = attrs.field(default=None, validator=optional(positive_int))
    lr: float | None = attrs.field(default=None, validator=optional(positive_number))
    entropy_coef: float | None = attrs.field(default=None)
    train_limit: int | None = attrs.field(default=None, validator=optional(positive_int))
    eval_limit: int | None = attrs.field(default=None, validator=optional(positive_int))


@attrs.frozen
class EstimatorDefaults:
    """The paper's settings for one estimator on one task (``../shared/PAPER_SETUP.md``)."""

    lr: float
    entropy_coef: float = 1.0
    batch_size: int = 64
    estimator_config: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class StepOutput:
    """One training step: ``loss`` (scalar, to backpropagate), detached scalar ``metrics`` and ``support [B]``."""

    loss: Tensor
    metrics: Mapping[str, Tensor]
    support: Tensor


TC = TypeVar("TC", bound=TaskConfig)


class Task(abc.ABC, Generic[TC]):
    """Base class of the registered tasks (``lvzoo.tasks`` entry points)."""

    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    #: Epochs of a full paper run (the runner's ``--epochs`` overrides it).
    default_epochs: ClassVar[int] = 1
    #: The estimators the paper compares on this task (registry names); ``runner reproduce`` runs these.
    paper_estimators: ClassVar[tuple[str, ...]] = ()
    #: The seeds of the paper's code for this task (``runner reproduce``'s default).
    paper_seeds: ClassVar[tuple[int, ...]] = (0,)

    def paper_variants(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Extra labelled paper variants ``label -> (estimator, task-config overrides)`` (e.g. a budgeted one)."""
        return {}

    def __init__(self, config: TC, estimator_name: str, data_dir: Path | None, device: torch.device) -> None:
        self.config = config
        self.estimator_name = estimator_name
        self.data_dir = data_dir
        self.device = device

    @abc.abstractmethod
    def latent_space(self) -> LatentSpace:
        """The latent space the encoder scores live in."""

    @abc.abstractmethod
    def estimator_defaults(self) -> EstimatorDefaults:
        """The paper's settings for ``self.estimator_name`` on this task."""

    @abc.abstractmethod
    def encoder_input_dim(self) -> int:
        """Flattened width of the encoder input passed to estimators (learned baselines use it)."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model (the runner moves it to the device and seeds the RNG first)."""

    @abc.abstractmethod
    def train_batches(self, generator: torch.Generator) -> Iterator[Any]:
        """One epoch of training batches (on the device), shuffled with ``generator``."""

    @abc.abstractmethod
    def steps_per_epoch(self) -> int:
        """Number of batches :meth:`train_batches` yields."""

    @abc.abstractmethod
    def train_step(self, model: nn.Module, estimator: Estimator[Any], batch: Any) -> StepOutput:
        """Loss of one batch, its metrics and the decoder rows used per example."""

    @abc.abstractmethod
    def evaluate(
        self, model: nn.Module, estimator: Estimator[Any], split: Literal["val", "test"], final: bool = False
    ) -> dict[str, float]:
        """Metrics on a held-out split (``final`` selects the expensive test protocol, e.g. 1024 IS samples)."""

    def save_artifacts(self, model: nn.Module, estimator: Estimator[Any], out_dir: Path) -> list[Path]:
        """Write task-specific artifacts (e.g. reconstructions) into ``out_dir``; returns the files written."""
        return []
