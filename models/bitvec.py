"""The bit-vector VAE of Correia et al. (2020; ``../shared/PAPER_SETUP.md`` Sec. 3.3) on 28x28 images with 256 grey
levels.

Encoder: pixels/255 ``[B, 784]`` -> 128 (ReLU) -> ``D`` scores ``t``. Decoder: bits ``[R, D]`` -> 128 (ReLU) ->
``784 * rank`` pixel features ``h`` -> a Linear(rank -> 256) shared by all pixels, i.e. an independent 256-way
categorical per pixel whose logits ``h_j W^T + b`` have rank ``rank`` (5 in the paper's code).

The likelihood is the time and memory hot spot: the full logits are ``[R, 784, 256]``. :meth:`log_likelihood`
(:func:`pixel_log_likelihood`) computes them ``chunk_rows`` decoder rows at a time into one reused buffer
(``addmm`` and an in-place ``log_softmax``), gathers the observed levels' log-probabilities and, when a gradient is
needed, turns the buffer into the softmax in place and keeps only softmax-weighted sums of ``[R, 784, rank]``,
``[R, 256, rank]`` and ``[R, 256]`` for the backward pass. The logits are computed once per call and never kept,
and the backward pass never recomputes them.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

PIXELS = 784
LEVELS = 256
#: Decoder rows per logits chunk on the CPU: a ``[4 * 784, 256]`` float32 buffer (3 MiB) stays in the cache,
#: which makes the likelihood about twice as fast there as one large chunk; other devices use ``chunk_rows``.
CPU_CHUNK_ROWS = 4


@attrs.frozen
class _LikelihoodSums:
    """What one pass over the logits computes: ``log_likelihood [R]`` and, when requested, the softmax-weighted
    sums ``expected_weight [R, P, rank]`` (``p_rj W``), ``expected_outer [R, V, rank]`` (``sum_j p_rj h_rj^T``)
    and ``prob_sums [R, V]`` (``sum_j p_rj``)."""

    log_likelihood: Tensor
    expected_weight: Tensor | None
    expected_outer: Tensor | None
    prob_sums: Tensor | None


def _likelihood_sums(
    features: Tensor,
    weight: Tensor,
    bias: Tensor,
    levels: Tensor,
    chunk_rows: int,
    needs: tuple[bool, bool, bool],
) -> _LikelihoodSums:
    """Per-row log-likelihoods of ``levels [R, P]`` under ``softmax(features [R, P, rank] @ weight.T + bias)``,
    ``chunk_rows`` rows at a time, plus the softmax-weighted sums that ``needs`` (features, weight, bias) asks for.

    One ``[chunk_rows * P, V]`` buffer is allocated and reused by every chunk: ``addmm`` and ``log_softmax``
    write into it, the target log-probabilities are gathered from it and, if a gradient is needed, it is
    exponentiated in place into the softmax probabilities that the weighted sums read. On the CPU, probabilities
    below ``e * tiny`` (about 3e-38 in float32) are raised to it first: subnormal floats make the CPU's ``exp``
    and matrix products 10-30 times slower on peaked outputs, and the change (under 1e-35 per sum) is far below
    the rounding of the sums.
    """
    rows, pixels, rank = features.shape
    levels_count = weight.shape[0]
    need_features, need_weight, need_bias = needs
    flat_features = features.reshape(rows * pixels, rank)
    flat_levels = levels.reshape(rows * pixels, 1)
    log_likelihood = features.new_empty(rows)
    expected_weight = torch.empty_like(flat_features) if need_features else None
    expected_outer = features.new_empty(rows, levels_count, rank) if need_weight else None
    prob_sums = features.new_empty(rows, levels_count) if need_bias else None
    chunk = max(1, min(chunk_rows, rows))
    buffer = features.new_empty(chunk * pixels, levels_count)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        pixel_slice = slice(start * pixels, stop * pixels)
        log_probs = buffer[: (stop - start) * pixels]  # [n, V]
        torch.addmm(bias, flat_features[pixel_slice], weight.T, out=log_probs)
        torch.log_softmax(log_probs, -1, out=log_probs)
        targets = log_probs.gather(1, flat_levels[pixel_slice]).reshape(stop - start, pixels)
        torch.sum(targets, -1, out=log_likelihood[start:stop])
        if not any(needs):
            continue
        if log_probs.device.type == "cpu":  # no subnormal probabilities: they slow exp and matmuls 10-30x on CPUs
            log_probs.clamp_min_(math.log(torch.finfo(log_probs.dtype).tiny) + 1.0)
        probs = log_probs.exp_()  # [n, V]
        if expected_weight is not None:
            torch.mm(probs, weight, out=expected_weight[pixel_slice])
        per_row = probs.reshape(stop - start, pixels, levels_count)  # [r, P, V]
        if expected_outer is not None:
            torch.bmm(per_row.transpose(1, 2), features[start:stop], out=expected_outer[start:stop])
        if prob_sums is not None:
            torch.sum(per_row, 1, out=prob_sums[start:stop])
    if expected_weight is not None:
        expected_weight = expected_weight.reshape(rows, pixels, rank)
    return _LikelihoodSums(log_likelihood, expected_weight, expected_outer, prob_sums)


class _PixelLogLikelihood(torch.autograd.Function):
    """``sum_j log_softmax(h_rj W^T + b)[x_rj]`` -> ``[R]`` for ``h [R, P, rank]``, ``W [V, rank]``, ``b [V]``,
    levels ``x [R, P]``, ``chunk_rows`` rows of ``[P, V]`` logits at a time.

    With ``p_rj = softmax(h_rj W^T + b)``, the gradients of row ``r``'s output are ``d/dh_rj = W[x_rj] - p_rj W``,
    ``d/dW = sum_j (e_{x_rj} - p_rj) h_rj^T`` and ``d/db = sum_j (e_{x_rj} - p_rj)``. The forward pass holds
    ``p`` anyway, so it saves the softmax-weighted sums (:class:`_LikelihoodSums`) of the inputs that need a
    gradient; the backward pass is a few ``[R, P, rank]`` operations and never recomputes the logits.
    """

    @staticmethod
    def forward(
        ctx: Any, features: Tensor, weight: Tensor, bias: Tensor, levels: Tensor, chunk_rows: int
    ) -> Tensor:
        needs = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2]))
        sums = _likelihood_sums(features, weight, bias, levels, chunk_rows, needs)
        saved_features = features if sums.expected_outer is not None else None
        ctx.save_for_backward(saved_features, weight, levels, sums.expected_weight, sums.expected_outer, sums.prob_sums)
        return sums.log_likelihood

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        features, weight, levels, expected_weight, expected_outer, prob_sums = ctx.saved_tensors
        row_grad = grad_out[:, None, None]  # [R, 1, 1]
        flat_levels = levels.reshape(-1)
        grad_features = grad_weight = grad_bias = None
        if expected_weight is not None:  # g_r (W[x_rj] - p_rj W)
            grad_features = (weight[levels] - expected_weight) * row_grad
        if expected_outer is not None:  # sum_r g_r sum_j (e_{x_rj} h_rj^T - p_rj h_rj^T)
            weighted_features = (features * row_grad).reshape(-1, features.shape[-1])
            grad_weight = torch.zeros_like(weight).index_add_(0, flat_levels, weighted_features)
            grad_weight -= torch.einsum("r,rvk->vk", grad_out, expected_outer)
        if prob_sums is not None:  # sum_r g_r (counts_r - sum_j p_rj)
            pixel_grads = grad_out.repeat_interleave(levels.shape[1])
            grad_bias = torch.zeros_like(prob_sums[0]).index_add_(0, flat_levels, pixel_grads)
            grad_bias -= grad_out @ prob_sums
        return grad_features, grad_weight, grad_bias, None, None


def pixel_log_likelihood(features: Tensor, weight: Tensor, bias: Tensor, levels: Tensor, chunk_rows: int) -> Tensor:
    """``sum_j log_softmax(features[r, j] @ weight.T + bias)[levels[r, j]]`` -> ``[R]``.

    ``features [R, P, rank]``, ``weight [V, rank]``, ``bias [V]``, ``levels [R, P]`` (long, in ``[0, V)``). Never
    holds more than ``chunk_rows * P * V`` logits, in the forward or the backward pass, and computes them once per
    call (see :class:`_PixelLogLikelihood`); without gradients (``torch.no_grad`` or no input requiring one)
    nothing is saved.
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if features.dim() != 3 or weight.shape != (bias.shape[0], features.shape[2]) or levels.shape != features.shape[:2]:
        raise ValueError(
            "expected features [R, P, rank], weight [V, rank], bias [V] and levels [R, P]; got "
            f"{tuple(features.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(levels.shape)}"
        )
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad or bias.requires_grad):
        result: Tensor = _PixelLogLikelihood.apply(features, weight, bias, levels, chunk_rows)
        return result
    with torch.no_grad():
        return _likelihood_sums(features, weight, bias, levels, chunk_rows, (False, False, False)).log_likelihood


class BitVectorVAEModel(nn.Module):
    """Encoder and 256-level decoder of the bit-vector VAE (see the module docstring).

    ``bits``: latent width D; ``hidden``: units of the single hidden layer of each network; ``rank``: width of the
    per-pixel features (the paper's ``out_rank``); ``chunk_rows``: the most decoder rows per logits chunk (bounds
    the likelihood's memory to ``chunk_rows * 784 * 256`` logits; on the CPU at most :data:`CPU_CHUNK_ROWS`).
    """

    def __init__(self, bits: int, hidden: int = 128, rank: int = 5, chunk_rows: int = 256) -> None:
        super().__init__()
        for name, value in (("bits", bits), ("hidden", hidden), ("rank", rank), ("chunk_rows", chunk_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.bits = bits
        self.rank = rank
        self.chunk_rows = chunk_rows
        self.encoder = nn.Sequential(nn.Linear(PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, bits))
        self.decoder = nn.Sequential(nn.Linear(bits, hidden), nn.ReLU(), nn.Linear(hidden, PIXELS * rank))
        self.pixel_output = nn.Linear(rank, LEVELS)

    def encode(self, images: Tensor) -> Tensor:
        """Bernoulli scores ``t [B, D]`` of uint8 images ``[B, 784]``."""
        scores: Tensor = self.encoder(images.to(self.pixel_output.weight.dtype) / 255.0)
        return scores

    def pixel_features(self, z_rows: Tensor) -> Tensor:
        """Per-pixel features ``h [R, 784, rank]`` of latent rows ``z_rows [R, D]`` (0/1 or relaxed)."""
        out: Tensor = self.decoder(z_rows.to(self.pixel_output.weight.dtype))
        return out.reshape(z_rows.shape[0], PIXELS, self.rank)

    def log_likelihood(self, z_rows: Tensor, images: Tensor) -> Tensor:
        """``log p(x_r | z_r)`` summed over pixels, ``[R]``, for ``z_rows [R, D]`` and uint8 ``images [R, 784]``.

        Equal (to floating-point tolerance) to ``log_softmax(logits).gather(x).sum()`` on the full logits, with
        memory bounded by ``chunk_rows`` (see the module docstring).
        """
        features = self.pixel_features(z_rows)  # [R, 784, rank]
        weight, bias = self.pixel_output.weight, self.pixel_output.bias  # [256, rank], [256]
        chunk_rows = min(self.chunk_rows, CPU_CHUNK_ROWS) if features.device.type == "cpu" else self.chunk_rows
        return pixel_log_likelihood(features, weight, bias, images.long(), chunk_rows)

    def most_likely_images(self, z_rows: Tensor) -> Tensor:
        """The per-pixel mode of ``p(x | z)``, uint8 ``[R, 784]``, for a few rows ``z_rows [R, D]``."""
        logits: Tensor = self.pixel_output(self.pixel_features(z_rows))  # [R, 784, 256]
        return logits.argmax(-1).to(torch.uint8)


__all__ = ["BitVectorVAEModel", "pixel_log_likelihood"]
