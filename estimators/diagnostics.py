"""Gradient diagnostics: the bias and variance of an estimator's gradient w.r.t. the encoder scores, against a
reference, at fixed scores and a fixed row loss (what ``runner diagnose`` reports per estimator and batch).

The reference is the gradient of ``E_pi[loss]`` for the estimator's own target distribution ``pi``:

- **exact** for the sampling estimators (pi = softmax / independent Bernoullis): the loss is evaluated on every
  assignment of ``Categorical(K)``, or of ``BitVector(D)`` up to :data:`MAX_EXACT_BITS`, in one call;
- **exact-mean** when the row loss is itself stochastic (two exact evaluations differ, e.g. the ssVAE samples its
  continuous ``h`` in every call): the mean of ``reference_draws`` exact evaluations, whose standard error enters
  :attr:`Diagnosis.bias_z`;
- **own** for marginalizing estimators: their gradient is exact for their own (sparse) distribution, so one
  evaluation is the reference and bias and variance are 0 by construction;
- **monte-carlo** otherwise: the mean of ``reference_draws`` leave-one-out REINFORCE estimates with
  ``reference_samples`` samples each (unbiased), whose own standard error enters :attr:`Diagnosis.bias_z`.

Shapes: ``B`` examples, scores ``[B, N]``, ``M`` draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from lvzoo.estimators.base import Estimator, LossFn, MarginalizingEstimator, evaluate_rows
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace

#: Largest bit-vector dimension whose exact reference enumerates all ``2**D`` rows per example.
MAX_EXACT_BITS = 12
ReferenceKind = Literal["exact", "exact-mean", "own", "monte-carlo"]


@attrs.frozen
class Diagnosis:
    """One estimator's gradient statistics over ``draws`` draws (all w.r.t. the scores, flattened over examples).

    ``bias_norm = ||E g - g_ref||`` and ``relative_bias`` (over ``||g_ref||``); ``bias_z``: ``bias_norm`` over its
    standard error ``sqrt(tr Var g / M + tr Var g_ref / M_ref)``, about 1 or less for an unbiased estimator;
    ``variance`` = ``tr Var g`` (one draw); ``cosine_single`` (mean over draws of ``cos(g, g_ref)``) and
    ``cosine_mean`` (``cos(E g, g_ref)``); ``snr = ||E g|| / sqrt(tr Var g)``; ``rows_per_example`` (decoder rows
    per example per draw) and ``ms_per_draw``.
    """

    reference: ReferenceKind
    draws: int
    bias_norm: float
    relative_bias: float
    bias_z: float
    variance: float
    cosine_single: float
    cosine_mean: float
    snr: float
    rows_per_example: float
    ms_per_draw: float

    def metrics(self) -> dict[str, float]:
        """The numeric fields (for tracking)."""
        return {key: float(value) for key, value in attrs.asdict(self).items() if key != "reference"}


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of the flattened last dims ``[..., D]`` (0 when either is 0)."""
    cosine: Tensor = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return cosine


def score_gradients(
    estimator: Estimator[Any], scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None, draws: int
) -> tuple[Tensor, float, float]:
    """``(gradients [M, B, N] of sum(surrogate) w.r.t. the scores, rows per example, ms per draw)``."""
    gradients, rows, started = [], 0.0, time.perf_counter()
    for _ in range(draws):
        leaf = scores.detach().clone().requires_grad_(True)
        result = estimator(leaf, loss_fn, encoder_input)
        (grad,) = torch.autograd.grad(result.surrogate.sum(), leaf)
        gradients.append(grad)
        rows += float(result.support.double().mean())
    elapsed_ms = 1000.0 * (time.perf_counter() - started) / draws
    return torch.stack(gradients), rows / draws, elapsed_ms


def exact_reference(space: LatentSpace, scores: Tensor, loss_fn: LossFn) -> Tensor:
    """``d/dscores sum_b E_pi[loss]`` ``[B, N]`` for the encoder distribution pi, by enumeration (one loss call)."""
    if isinstance(space, BitVector) and (space.D > MAX_EXACT_BITS or space.budget is not None):
        raise ValueError(f"no exact reference for {space!r}: at most D={MAX_EXACT_BITS} bits without budget")
    leaf = scores.detach().clone().requires_grad_(True)
    table = space.enumerate().to(scores.dtype).to(scores.device)  # [A, N]
    batch, count = scores.shape[0], table.shape[0]
    rows = table.repeat(batch, 1)
    index = torch.arange(batch, device=scores.device).repeat_interleave(count)
    losses = evaluate_rows(loss_fn, rows, index).detach().reshape(batch, count)
    if isinstance(space, Categorical):
        log_probs = torch.log_softmax(leaf, -1)
    else:  # log pi(z) = sum_i z_i log sigmoid(t_i) + (1 - z_i) log sigmoid(-t_i), for every row of the table
        log_probs = F.logsigmoid(leaf) @ table.T + F.logsigmoid(-leaf) @ (1 - table).T
    value = (log_probs.exp() * losses).sum()
    (grad,) = torch.autograd.grad(value, leaf)
    return grad


def monte_carlo_reference(
    space: LatentSpace, scores: Tensor, loss_fn: LossFn, draws: int, samples: int
) -> tuple[Tensor, Tensor]:
    """``(mean [B, N], per-draw gradients [draws, B, N])`` of leave-one-out REINFORCE with ``samples`` samples."""
    from lvzoo.estimators.score_function import ScoreFunction, ScoreFunctionConfig

    reference = ScoreFunction(space, ScoreFunctionConfig(samples=samples, baseline="leave_one_out"))
    gradients = score_gradients(reference.to(scores.device), scores, loss_fn, None, draws)[0]
    return gradients.mean(0), gradients


def statistics(
    kind: ReferenceKind,
    draws: Tensor,
    reference: Tensor,
    reference_draws: Tensor | None,
    rows: float,
    ms: float,
) -> Diagnosis:
    """The :class:`Diagnosis` of gradient ``draws [M, ...]`` against ``reference`` (the mean of ``reference_draws``
    ``[R, ...]`` when it is a Monte-Carlo one, else exact)."""
    flat = draws.double().reshape(draws.shape[0], -1)
    target = reference.double().reshape(-1)
    mean = flat.mean(0)
    variance = flat.var(0).sum() if flat.shape[0] > 1 else torch.zeros((), dtype=torch.float64)
    error_sq = variance / flat.shape[0]
    if reference_draws is not None:
        error_sq = error_sq + reference_draws.double().reshape(reference_draws.shape[0], -1).var(0).sum() / len(
            reference_draws
        )
    bias, error = (mean - target).norm(), error_sq.sqrt()
    return Diagnosis(
        reference=kind,
        draws=int(flat.shape[0]),
        bias_norm=float(bias),
        relative_bias=float(bias / target.norm().clamp_min(1e-300)),
        bias_z=float(bias / error) if float(error) > 0 else (0.0 if float(bias) == 0 else math.inf),
        variance=float(variance),
        cosine_single=float(_cosine(flat, target.expand_as(flat)).mean()),
        cosine_mean=float(_cosine(mean, target)),
        snr=float(mean.norm() / variance.sqrt()) if float(variance) > 0 else math.inf,
        rows_per_example=rows,
        ms_per_draw=ms,
    )


@attrs.frozen
class Gradients:
    """The raw material of a diagnosis: the estimator's ``draws [M, B, N]``, the ``reference [B, N]`` and, for a
    Monte-Carlo reference, its ``reference_draws [R, B, N]``."""

    draws: Tensor
    reference: Tensor
    reference_draws: Tensor | None


def reference_gradient(
    space: LatentSpace, scores: Tensor, loss_fn: LossFn, *, reference_draws: int = 50, reference_samples: int = 32
) -> tuple[ReferenceKind, Tensor, Tensor | None]:
    """``(kind, reference [B, N], its draws [R, B, N] or None)`` for the sampling estimators of ``space`` (the
    module docstring's exact, exact-mean or monte-carlo reference); compute it once per batch and share it."""
    try:
        reference = exact_reference(space, scores, loss_fn)
    except ValueError:
        mean, draws = monte_carlo_reference(space, scores, loss_fn, reference_draws, reference_samples)
        return "monte-carlo", mean, draws
    again = exact_reference(space, scores, loss_fn)
    if torch.equal(reference, again):
        return "exact", reference, None
    # a stochastic row loss (e.g. the ssVAE's sampled h): average exact evaluations
    more = [exact_reference(space, scores, loss_fn) for _ in range(reference_draws - 2)]
    repeats = torch.stack([reference, again, *more])
    return "exact-mean", repeats.mean(0), repeats


def diagnose(
    estimator: Estimator[Any],
    scores: Tensor,
    loss_fn: LossFn,
    encoder_input: Tensor | None = None,
    *,
    draws: int = 100,
    reference: tuple[ReferenceKind, Tensor, Tensor | None] | None = None,
    reference_draws: int = 50,
    reference_samples: int = 32,
) -> tuple[Diagnosis, Gradients]:
    """``(diagnosis, gradients)`` of ``estimator``'s score gradient on one batch (see the module docstring);
    ``reference``: a precomputed :func:`reference_gradient` for these scores and loss (else computed here)."""
    kind: ReferenceKind
    target_draws: Tensor | None
    if isinstance(estimator, MarginalizingEstimator):
        gradients, rows, ms = score_gradients(estimator, scores, loss_fn, encoder_input, 1)
        kind, target, target_draws = "own", gradients[0], None
    else:
        gradients, rows, ms = score_gradients(estimator, scores, loss_fn, encoder_input, draws)
        kind, target, target_draws = reference or reference_gradient(
            estimator.space, scores, loss_fn, reference_draws=reference_draws, reference_samples=reference_samples
        )
    raw = Gradients(gradients, target, target_draws)
    return statistics(kind, gradients, target, target_draws, rows, ms), raw


def through_encoder(scores_graph: Tensor, parameters: Sequence[Tensor], score_gradients: Tensor) -> Tensor:
    """Score gradients ``[M, B, N]`` carried to the encoder parameters (``J^T g`` through ``scores_graph``, the scores
    as the encoder computed them): ``[M, P]``, the parameters flattened and concatenated."""
    carried = []
    for gradient in score_gradients:
        grads = torch.autograd.grad(
            scores_graph,
            parameters,
            grad_outputs=gradient.to(scores_graph.dtype),
            retain_graph=True,
            allow_unused=True,
        )
        pieces = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, parameters, strict=True)]
        carried.append(torch.cat([piece.reshape(-1) for piece in pieces]))
    return torch.stack(carried)
