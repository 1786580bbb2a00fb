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
import hashlib
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import Estimator, EstimatorResult, LossFn
from lvzoo.estimators.spaces import LatentSpace
from lvzoo.estimators.validators import finite_number, non_negative_int, optional, positive_int, positive_number

# --- the shared objective ---------------------------------------------------------------------------------------
# A task states a batch's problem (BatchObjective): the latent part (LatentProblem: encoder scores [B, N], the row
# loss, the encoder input, a per-example prior term and a weight), any other loss term (e.g. a supervised loss) and
# its own metrics. latent_step runs the estimator on the latent part once and composes
#     loss = weight * mean(surrogate + prior - entropy_coef * entropy) + other_loss
# with the estimator's support and logs (the loop reads both from the StepOutput).


@attrs.frozen
class LatentProblem:
    """The latent-variable part of a batch.

    ``scores [B, N]``: the encoder's scores of pi(z | x); ``loss_fn``: the row loss the estimator evaluates;
    ``encoder_input [B, ...]`` (learned baselines read it); ``prior``: a term added to every example's expected loss
    (a float or ``[B]``, e.g. ``-log p(z) = log K`` so that ``E[loss] + prior - H`` is the -ELBO); ``weight``: of the
    latent part's batch mean in the total (e.g. the unlabelled / labelled size ratio).
    """

    scores: Tensor
    loss_fn: LossFn
    encoder_input: Tensor | None = None
    prior: Tensor | float = 0.0
    weight: float = 1.0


@attrs.frozen
class LatentTerms:
    """The estimator's ``result`` on a :class:`LatentProblem` and the per-example latent ``loss [B]``
    ``surrogate + prior - entropy_coef * entropy`` (differentiable)."""

    loss: Tensor
    result: EstimatorResult
    prior: Tensor | float

    @property
    def bound(self) -> Tensor:
        """``objective + prior - entropy`` per example ``[B]`` (detached; the -ELBO for the VAEs)."""
        return self.result.objective + self.prior - self.result.entropy.detach()


def latent_terms(latent: LatentProblem, estimator: Estimator[Any], entropy_coef: float) -> LatentTerms:
    """Run ``estimator`` once (one loss call) on ``latent``: :class:`LatentTerms`."""
    result = estimator(latent.scores, latent.loss_fn, latent.encoder_input)
    loss = result.surrogate + latent.prior - entropy_coef * result.entropy
    return LatentTerms(loss=loss, result=result, prior=latent.prior)


@attrs.frozen
class BatchObjective:
    """A batch's problem as a task states it: the ``latent`` part (``None`` when the batch has none, e.g. a
    supervised warm start), ``other_loss`` (a scalar added to the total, e.g. the labelled loss), the task's own
    detached scalar ``metrics``, ``result_metrics`` (more metrics from the estimator's result, e.g. the -ELBO) and
    ``support`` (decoder calls per example ``[B]`` when there is no latent part)."""

    latent: LatentProblem | None
    other_loss: Tensor | None = None
    metrics: Mapping[str, Tensor] = attrs.field(factory=dict)
    result_metrics: Callable[[LatentTerms], Mapping[str, Tensor]] | None = None
    support: Tensor | None = None


@attrs.frozen
class StepOutput:
    """One training step: ``loss`` (scalar, to backpropagate), detached scalar ``metrics``, ``support [B]`` and the
    estimator's detached ``logs`` (:attr:`EstimatorResult.logs`; empty for a batch without a latent part)."""

    loss: Tensor
    metrics: Mapping[str, Tensor]
    support: Tensor
    logs: Mapping[str, Tensor] = attrs.field(factory=dict)


def latent_step(objective: BatchObjective, estimator: Estimator[Any], entropy_coef: float) -> StepOutput:
    """Run ``estimator`` once on ``objective.latent`` and compose the loss of the module docstring.

    Metrics: the task's, ``entropy`` (mean entropy of pi) and ``result_metrics``'s; ``support`` is the estimator's.
    """
    metrics = dict(objective.metrics)
    other = objective.other_loss
    latent = objective.latent
    if latent is None:
        if other is None or objective.support is None:
            raise ValueError("a batch without a latent part needs other_loss and support")
        return StepOutput(loss=other, metrics=metrics, support=objective.support)
    terms = latent_terms(latent, estimator, entropy_coef)
    loss = latent.weight * terms.loss.mean()
    if other is not None:
        loss = loss + other
    metrics["entropy"] = terms.result.entropy.detach().mean()
    if objective.result_metrics is not None:
        metrics.update(objective.result_metrics(terms))
    logs = {key: value.detach() for key, value in terms.result.logs.items()}
    return StepOutput(loss=loss, metrics=metrics, support=terms.result.support, logs=logs)


@contextmanager
def evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for ``modules`` inside the block; their training flags are restored after."""
    flags = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.train(flag)


# --- the task interface ----------------------------------------------------------------------------------------

@attrs.frozen
class TaskConfig:
    """Hyper-parameters every task has (resolved values: see :func:`resolve_config`).

    ``train_limit`` / ``eval_limit``: at most this many training / evaluation examples (``None``: all).
    ``skip_nonfinite_steps``: training steps with a non-finite loss or gradient the run may skip (each one logged)
    before it stops with an error; 0 stops at the first. ``diagnose_every``: every this many steps, log the gradient
    diagnostics of the run's estimator on a fixed batch (``diagnose_*`` metrics; 0: never).
    """

    batch_size: int = attrs.field(default=64, validator=positive_int)
    lr: float = attrs.field(default=1e-3, validator=positive_number)
    entropy_coef: float = attrs.field(default=1.0, validator=finite_number)
    train_limit: int | None = attrs.field(default=None, validator=optional(positive_int))
    eval_limit: int | None = attrs.field(default=None, validator=optional(positive_int))
    skip_nonfinite_steps: int = attrs.field(default=0, validator=non_negative_int)
    diagnose_every: int = attrs.field(default=0, validator=non_negative_int)


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
    #: ``(metric, mode)`` a sweep selects trials by, by default: an epoch metric name and ``"min"`` or ``"max"``.
    selection_metric: ClassVar[tuple[str, str]] = ("val_loss", "min")

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
        """The problem of one training batch (:class:`BatchObjective`)."""

    def train_step(self, model: nn.Module, estimator: Estimator[Any], batch: Any) -> StepOutput:
        """Loss of one batch, its metrics and the decoder rows used per example: the shared objective
        (:func:`latent_step`) of :meth:`objective` with ``config.entropy_coef``."""
        return latent_step(self.objective(model, batch), estimator, self.config.entropy_coef)

    @abc.abstractmethod
    def evaluate(
        self, model: nn.Module, estimator: Estimator[Any], split: Literal["val", "test"], final: bool = False
    ) -> dict[str, float]:
        """Metrics on a held-out split (``final`` selects the expensive test protocol, e.g. 1024 IS samples)."""

    def description(self) -> str:
        """What the experiment tracker shows for this task: the first paragraph of its module's docstring (else of
        its class's) and the metric a sweep selects by."""
        module = sys.modules.get(type(self).__module__)
        text = (module.__doc__ if module is not None else None) or type(self).__doc__ or type(self).__name__
        summary = " ".join(text.strip().split("\n\n")[0].split())
        metric, mode = self.selection_metric
        return f"{summary} Selection metric: {metric} ({mode})."

    def dataset_description(self) -> dict[str, Any]:
        """The data a run trains on: ``name``, ``digest`` (see :func:`tensor_digest`), ``source`` and the example
        count of each split, ``splits``. Tasks override it to describe their data (this default knows none)."""
        return {"name": type(self).__name__, "digest": "unknown", "source": "", "splits": {}}

    def save_artifacts(self, model: nn.Module, estimator: Estimator[Any], out_dir: Path) -> list[Path]:
        """Write task-specific artifacts (e.g. reconstructions) into ``out_dir``; returns the files written."""
        return []


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 (hex) of the tensors' shapes and bytes, in order: the digest of a dataset as a run saw it."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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
