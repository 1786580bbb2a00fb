"""The one training objective every task shares, and the one way to evaluate in eval mode.

A task states a batch's problem (:class:`BatchObjective`): the latent part (:class:`LatentProblem`: encoder scores
``[B, N]``, the row loss, the encoder input, a per-example prior term and a weight), any other loss term (e.g. a
supervised loss) and its own metrics. :func:`latent_step` runs the estimator on the latent part once and composes

    loss = weight * mean(surrogate + prior - entropy_coef * entropy) + other_loss

with the estimator's support; the loop reads the support statistics and the estimator's logs itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import Estimator, EstimatorResult, LossFn


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
    """One training step: ``loss`` (scalar, to backpropagate), detached scalar ``metrics`` and ``support [B]``."""

    loss: Tensor
    metrics: Mapping[str, Tensor]
    support: Tensor


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
    return StepOutput(loss=loss, metrics=metrics, support=terms.result.support)


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
