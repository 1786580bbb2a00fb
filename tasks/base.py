"""The task interface the generic runner trains: data, model, per-step loss and evaluation.

A task owns its data splits and its paper settings (a table keyed by estimator name, :meth:`Task.paper_settings`,
the only place a task names an estimator); the runner owns the loop, the optimizer, checkpoints and tracking. A task
is constructed from a fully resolved config (:func:`resolve_config`: field defaults, then the paper's settings for
the estimator, then the user's values) and never learns which estimator trains it. Batches are already on the
task's device; ``train_step`` and ``evaluate`` never move data to the host inside the hot path (metrics are
returned as tensors and only read once per logging interval).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import attrs
import torch
from torch import nn

from lvzoo.estimators.base import Estimator
from lvzoo.estimators.spaces import LatentSpace
from lvzoo.estimators.validators import finite_number, optional, positive_int, positive_number
from lvzoo.tasks.objective import BatchObjective, StepOutput, latent_step


@attrs.frozen
class TaskConfig:
    """Hyper-parameters every task has (resolved values: see :func:`resolve_config`).

    ``train_limit`` / ``eval_limit``: at most this many training / evaluation examples (``None``: all).
    """

    batch_size: int = attrs.field(default=64, validator=positive_int)
    lr: float = attrs.field(default=1e-3, validator=positive_number)
    entropy_coef: float = attrs.field(default=1.0, validator=finite_number)
    train_limit: int | None = attrs.field(default=None, validator=optional(positive_int))
    eval_limit: int | None = attrs.field(default=None, validator=optional(positive_int))


@attrs.frozen
class PaperSettings:
    """The paper's settings for one estimator on one task (``../shared/PAPER_SETUP.md``): task-config values
    (``lr``, ``entropy_coef``, ``batch_size``, task options) and estimator-config values."""

    task: Mapping[str, Any] = attrs.field(factory=dict)
    estimator: Mapping[str, Any] = attrs.field(factory=dict)


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

    @classmethod
    def paper_variants(cls, config: TC) -> dict[str, tuple[str, dict[str, Any]]]:
        """Extra labelled paper variants ``label -> (estimator, task-config overrides)`` (e.g. a budgeted one)."""
        return {}

    @classmethod
    def paper_settings(cls, estimator: str, config: TC) -> PaperSettings:
        """The paper's settings for ``estimator`` given the user's ``config`` (e.g. its latent size); none here."""
        return PaperSettings()

    def __init__(self, config: TC, data_dir: Path | None, device: torch.device) -> None:
        self.config = config
        self.data_dir = data_dir
        self.device = device

    @abc.abstractmethod
    def latent_space(self) -> LatentSpace:
        """The latent space the encoder scores live in."""

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
    def objective(self, model: nn.Module, batch: Any) -> BatchObjective:
        """The problem of one training batch (:class:`~lvzoo.tasks.objective.BatchObjective`)."""

    def train_step(self, model: nn.Module, estimator: Estimator[Any], batch: Any) -> StepOutput:
        """Loss of one batch, its metrics and the decoder rows used per example: the shared objective
        (:func:`~lvzoo.tasks.objective.latent_step`) of :meth:`objective` with ``config.entropy_coef``."""
        return latent_step(self.objective(model, batch), estimator, self.config.entropy_coef)

    @abc.abstractmethod
    def evaluate(
        self, model: nn.Module, estimator: Estimator[Any], split: Literal["val", "test"], final: bool = False
    ) -> dict[str, float]:
        """Metrics on a held-out split (``final`` selects the expensive test protocol, e.g. 1024 IS samples)."""

    def save_artifacts(self, model: nn.Module, estimator: Estimator[Any], out_dir: Path) -> list[Path]:
        """Write task-specific artifacts (e.g. reconstructions) into ``out_dir``; returns the files written."""
        return []


def resolve_config(
    task_cls: type[Task[TC]], estimator: str, values: Mapping[str, Any] | None = None
) -> tuple[TC, dict[str, Any]]:
    """``(task config, estimator-config values)`` for training ``task_cls`` with ``estimator``.

    Precedence: the config's field defaults, then :meth:`Task.paper_settings` (computed from the config of the
    user's ``values``, so a table may depend on e.g. the latent size), then ``values`` (already typed). Raises
    ``ValueError`` / ``TypeError`` from the config's validators. The estimator values still need the user's own on top.
    """
    user = dict(values or {})
    config_class: Any = task_cls.config_class
    settings = task_cls.paper_settings(estimator, config_class(**user))
    config: TC = config_class(**{**settings.task, **user})
    return config, dict(settings.estimator)
