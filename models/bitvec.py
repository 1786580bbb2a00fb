"""The bit-vector VAE of Correia et al. (2020; ``../shared/PAPER_SETUP.md`` Sec. 3.3) on 28x28 images with 256 grey levels.

Encoder: pixels/255 ``[B, 784]`` -> 128 (ReLU) -> ``D`` scores ``t``. Decoder: bits ``[R, D]`` -> 128 (ReLU) ->
``784 * rank`` pixel features ``h`` -> a Linear(rank -> 256) shared by all pixels, i.e. an independent 256-way
categorical per pixel whose logits ``h_j W^T + b`` have rank ``rank`` (5 in the paper's code).

The likelihood is the memory hot spot: the full logits are ``[R, 784, 256]``. :meth:`log_likelihood` uses the
rank structure, ``log p(x_j | z) = <h_j, W[x_j]> + b[x_j] - logsumexp_v(<h_j, W_v> + b_v)``: the target term is a
gather of ``[R, 784, rank]``, and the log-partition is computed ``chunk_rows`` decoder rows at a time by a custom
autograd function that recomputes the softmax chunk by chunk in the backward pass, so only ``[R, 784, rank]``
features (never ``[R, 784, 256]`` logits) are kept for backpropagation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

PIXELS = 784
LEVELS = 256


class _ChunkedLogPartition(torch.autograd.Function):
    """``logsumexp_v(h_n W_v^T + b_v)`` for ``h [N, rank]``, ``W [V, rank]``, ``b [V]`` -> ``[N]``, in chunks."""

    @staticmethod
    def forward(ctx: Any, features: Tensor, weight: Tensor, bias: Tensor, chunk: int) -> Tensor:
        out = features.new_empty(features.shape[0])
        for start in range(0, features.shape[0], chunk):
            logits = torch.addmm(bias, features[start : start + chunk], weight.T)
            out[start : start + chunk] = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(features, weight, bias, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        features, weight, bias, log_partition = ctx.saved_tensors
        need_features, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_features = torch.empty_like(features) if need_features else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for start in range(0, features.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            chunk_features = features[start:stop]
            logits = torch.addmm(bias, chunk_features, weight.T)
            # d logsumexp / d logits = softmax; weighted by the incoming gradient: [chunk, V]
            weighted = torch.exp(logits - log_partition[start:stop, None]) * grad_out[start:stop, None]
            if grad_features is not None:
                grad_features[start:stop] = weighted @ weight
            if grad_weight is not None:
                grad_weight += weighted.T @ chunk_features
            if grad_bias is not None:
                grad_bias += weighted.sum(0)
        return grad_features, grad_weight, grad_bias, None


def chunked_log_partition(features: Tensor, weight: Tensor, bias: Tensor, chunk: int) -> Tensor:
    """``logsumexp(features @ weight.T + bias, -1)`` for ``features [N, rank]`` -> ``[N]``.

    Never materializes more than ``[chunk, V]`` logits, in the forward or the backward pass.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    result: Tensor = _ChunkedLogPartition.apply(features, weight, bias, chunk)
    return result


class BitVectorVAEModel(nn.Module):
    """Encoder and 256-level decoder of the bit-vector VAE (see the module docstring).

    ``bits``: latent width D; ``hidden``: units of the single hidden layer of each network; ``rank``: width of the
    per-pixel features (the paper's ``out_rank``); ``chunk_rows``: decoder rows per log-partition chunk
    (bounds the likelihood's memory to ``chunk_rows * 784 * 256`` logits).
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
        levels = images.long()
        weight, bias = self.pixel_output.weight, self.pixel_output.bias  # [256, rank], [256]
        target = (features * weight[levels]).sum(-1) + bias[levels]  # [R, 784]
        log_partition = chunked_log_partition(
            features.reshape(-1, self.rank), weight, bias, self.chunk_rows * PIXELS
        ).reshape(target.shape)
        return (target - log_partition).sum(-1)

    def most_likely_images(self, z_rows: Tensor) -> Tensor:
        """The per-pixel mode of ``p(x | z)``, uint8 ``[R, 784]``, for a few rows ``z_rows [R, D]``."""
        logits: Tensor = self.pixel_output(self.pixel_features(z_rows))  # [R, 784, 256]
        return logits.argmax(-1).to(torch.uint8)


__all__ = ["BitVectorVAEModel", "chunked_log_partition"]
