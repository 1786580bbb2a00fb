"""The bit-vector decoder's fused 256-way likelihood against the naive full ``log_softmax`` (values and gradients),
for every chunking, with and without gradients, and its memory contract (no ``[R, 784, 256]`` tensor is kept for
the backward pass)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lvzoo.models.bitvec import LEVELS, PIXELS, BitVectorVAEModel, pixel_log_likelihood

BITS = 5
ROWS = 7


def _model(dtype: torch.dtype = torch.float64, chunk_rows: int = 3, output_scale: float = 8.0) -> BitVectorVAEModel:
    """A small model whose output weights are scaled by ``output_scale`` (peaked per-pixel distributions)."""
    torch.manual_seed(0)
    model = BitVectorVAEModel(BITS, hidden=16, chunk_rows=chunk_rows).to(dtype)
    with torch.no_grad():
        model.pixel_output.weight.mul_(output_scale)
    return model


def _inputs(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    z = (torch.rand(ROWS, BITS, generator=generator) > 0.5).to(dtype)
    images = torch.randint(0, LEVELS, (ROWS, PIXELS), generator=generator, dtype=torch.uint8)
    return z, images


def _naive_log_likelihood(model: BitVectorVAEModel, z: Tensor, images: Tensor) -> Tensor:
    logits = model.pixel_output(model.pixel_features(z))  # [R, 784, 256]
    return F.log_softmax(logits, -1).gather(-1, images.long().unsqueeze(-1)).squeeze(-1).sum(-1)


def _value_and_grads(model: BitVectorVAEModel, z: Tensor, images: Tensor, naive: bool) -> list[Tensor]:
    """``[log-likelihood [R], d/dz, d/d(decoder and output parameters)...]`` of ``sum_r g_r ll_r``."""
    z = z.clone().requires_grad_(True)
    ll = _naive_log_likelihood(model, z, images) if naive else model.log_likelihood(z, images)
    weights = torch.linspace(-1.0, 2.0, ROWS, dtype=ll.dtype)  # distinct per-row upstream gradients
    parameters = [z, *model.decoder.parameters(), *model.pixel_output.parameters()]
    return [ll.detach(), *torch.autograd.grad((ll * weights).sum(), parameters)]


@pytest.mark.parametrize("chunk_rows", [1, 3, ROWS, 64])
def test_matches_naive_log_softmax_in_float64(chunk_rows: int) -> None:
    model = _model(chunk_rows=chunk_rows)
    z, images = _inputs()
    fused = _value_and_grads(model, z, images, naive=False)
    naive = _value_and_grads(model, z, images, naive=True)
    for got, want in zip(fused, naive, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_rows,output_scale", [(2, 8.0), (256, 8.0), (2, 3000.0)])
def test_float32_is_within_rounding_of_float64(chunk_rows: int, output_scale: float) -> None:
    """Also with very peaked outputs (scale 3000), where float32 probabilities underflow below ``tiny``."""
    z, images = _inputs()
    exact = _value_and_grads(_model(torch.float64, chunk_rows, output_scale), z, images, naive=True)
    single = _value_and_grads(_model(torch.float32, chunk_rows, output_scale), z.float(), images, naive=False)
    for got, want in zip(single, exact, strict=True):
        scale = want.abs().max().clamp_min(1.0)
        assert float((got.double() - want).abs().max() / scale) < 1e-4


def test_chunking_changes_nothing_in_float32() -> None:
    z, images = _inputs(torch.float32)
    model = _model(torch.float32)
    reference = _value_and_grads(model, z, images, naive=False)
    for chunk_rows in (1, 2, 5, 100):
        features = model.pixel_features(z)
        weight, bias = model.pixel_output.weight, model.pixel_output.bias
        with torch.no_grad():
            value = pixel_log_likelihood(features, weight, bias, images.long(), chunk_rows)
        torch.testing.assert_close(value, reference[0], rtol=1e-6, atol=1e-4)


def test_no_grad_equals_grad_path() -> None:
    model = _model()
    z, images = _inputs()
    with torch.no_grad():
        without = model.log_likelihood(z, images)
    with_grad = model.log_likelihood(z, images)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0.0, atol=0.0)


def test_frozen_output_layer_gets_no_gradient_and_features_still_exact() -> None:
    model = _model()
    model.pixel_output.requires_grad_(False)
    z, images = _inputs()
    z_fused = z.clone().requires_grad_(True)
    z_naive = z.clone().requires_grad_(True)
    (grad_fused,) = torch.autograd.grad(model.log_likelihood(z_fused, images).sum(), z_fused)
    (grad_naive,) = torch.autograd.grad(_naive_log_likelihood(model, z_naive, images).sum(), z_naive)
    torch.testing.assert_close(grad_fused, grad_naive, rtol=1e-12, atol=1e-12)
    assert model.pixel_output.weight.grad is None


def test_no_full_logits_are_saved_for_backward() -> None:
    model = _model(torch.float32, chunk_rows=ROWS)
    z, images = _inputs(torch.float32)
    saved_sizes: list[int] = []

    def pack(tensor: Tensor) -> Tensor:
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ll = model.log_likelihood(z.requires_grad_(True), images)
    torch.autograd.backward(ll.sum())
    assert saved_sizes, "the likelihood saved nothing for backward"
    assert max(saved_sizes) < PIXELS * LEVELS  # not even one row's logits [784, 256] is kept


def test_bad_arguments_are_refused() -> None:
    model = _model()
    z, images = _inputs()
    features = model.pixel_features(z)
    weight, bias = model.pixel_output.weight, model.pixel_output.bias
    with pytest.raises(ValueError, match="chunk_rows must be a positive int, got 0"):
        pixel_log_likelihood(features, weight, bias, images.long(), 0)
    with pytest.raises(ValueError, match=r"levels \[R, P\]"):
        pixel_log_likelihood(features, weight, bias, images.long()[:, :10], 2)
