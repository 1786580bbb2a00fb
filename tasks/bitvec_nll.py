"""Held-out log-likelihood of the bit-vector VAE (:mod:`lvzoo.tasks.bitvec`): Bernoulli importance sampling for
factorised posteriors and the exact-support-plus-prior-samples split for sparse posteriors; posterior helpers.

Shapes: ``B`` examples, ``D`` bits, ``S`` samples per example, ``R`` rows of a sparse posterior.
Module-level functions, so tests can check them against exact enumeration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lvzoo.estimators.base import SparseDistribution
from lvzoo.models.bitvec import BitVectorVAEModel

LOG2 = math.log(2.0)


def log_mean_exp(values: Tensor, dim: int) -> Tensor:
    """``log mean exp(values)`` along ``dim``."""
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def bernoulli_log_prob(scores: Tensor, z: Tensor) -> Tensor:
    """``log q(z)`` under independent ``Bernoulli(sigmoid(scores))``; ``scores [..., D]``, ``z [..., D]`` ->
    ``[...]``."""
    return (z * F.logsigmoid(scores) + (1 - z) * F.logsigmoid(-scores)).sum(-1)


def bernoulli_entropy(scores: Tensor) -> Tensor:
    """Entropy of independent ``Bernoulli(sigmoid(scores))``, ``scores [B, D]`` -> ``[B]``."""
    probs = torch.sigmoid(scores)
    return (probs * F.softplus(-scores) + (1 - probs) * F.softplus(scores)).sum(-1)


def bernoulli_importance_samples(
    model: BitVectorVAEModel,
    scores: Tensor,
    images: Tensor,
    num_samples: int,
    generator: torch.Generator | None,
    pass_rows: int,
) -> tuple[Tensor, Tensor]:
    """``(log p(x|z_s), log w_s)``, both ``[B, S]``, for ``z_s ~ Bernoulli(sigmoid(scores))``.

    ``scores [B, D]``, uint8 ``images [B, 784]``; ``log w_s = log p(x|z_s) + log p(z_s) - log q(z_s)`` with the
    uniform prior. The ``B * S`` decoder rows are evaluated about ``pass_rows`` at a time.
    """
    batch, bits = scores.shape
    per_pass = max(1, pass_rows // batch)
    probs = torch.sigmoid(scores).unsqueeze(1)  # [B, 1, D]
    log_likelihoods, log_weights = [], []
    for start in range(0, num_samples, per_pass):
        count = min(per_pass, num_samples - start)
        uniform = torch.rand(batch, count, bits, generator=generator, device=scores.device, dtype=scores.dtype)
        z = (uniform < probs).to(scores.dtype)  # [B, n, D]
        log_likelihood = model.log_likelihood(z.reshape(-1, bits), images.repeat_interleave(count, 0))
        log_likelihood = log_likelihood.reshape(batch, count)
        log_likelihoods.append(log_likelihood)
        log_weights.append(log_likelihood - bits * LOG2 - bernoulli_log_prob(scores.unsqueeze(1), z))
    return torch.cat(log_likelihoods, 1), torch.cat(log_weights, 1)


def pad_by_example(values: Tensor, example_index: Tensor, num_examples: int, fill: float) -> tuple[Tensor, Tensor]:
    """Ragged rows ``values [R, ...]`` grouped by non-decreasing ``example_index [R]`` ->
    ``([B, K, ...], valid [B, K])``.

    ``K`` is the largest group; missing entries hold ``fill``.
    """
    counts = torch.bincount(example_index, minlength=num_examples)
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(values.shape[0], device=values.device) - offsets[example_index]
    width = max(int(counts.max()), 1) if num_examples > 0 else 1
    padded = values.new_full((num_examples, width, *values.shape[1:]), fill)
    padded[example_index, slot] = values
    valid = torch.zeros(num_examples, width, dtype=torch.bool, device=values.device)
    valid[example_index, slot] = True
    return padded, valid


def pack_bits(z: Tensor) -> Tensor:
    """Pack 0/1 rows ``z [..., D]`` into int64 words ``[..., ceil(D / 62)]`` (equal rows <=> equal words)."""
    word_bits = 62
    bits = (z > 0.5).long()
    padding = -bits.shape[-1] % word_bits
    bits = F.pad(bits, (0, padding)).reshape(*bits.shape[:-1], -1, word_bits)
    powers = torch.ones(word_bits, dtype=torch.long, device=z.device) << torch.arange(word_bits, device=z.device)
    return (bits * powers).sum(-1)


def sparse_log_marginal_terms(
    model: BitVectorVAEModel,
    distribution: SparseDistribution,
    support_log_likelihood: Tensor,
    images: Tensor,
    num_samples: int,
    generator: torch.Generator | None,
    pass_rows: int,
) -> tuple[Tensor, Tensor]:
    """``(support_term [B], complement_terms [B, M])`` of the split estimate of ``log p(x)``.

    ``support_term = log sum_{z in S} p(z) p(x|z)`` (exact, from ``support_log_likelihood [R] = log p(x|z_r)``
    of the support rows); ``complement_terms[b, m] = log p(x_b|z_m)`` for ``z_m`` drawn from the uniform prior, or
    ``-inf`` when ``z_m`` is in ``S_b``, so ``logmeanexp`` of them estimates ``log sum_{z not in S} p(z) p(x|z)``
    without bias in ``p``. uint8 ``images [B, 784]``.
    """
    batch = distribution.num_examples
    bits = distribution.z_rows.shape[1]
    minus_inf = float("-inf")
    padded_ll, _ = pad_by_example(support_log_likelihood, distribution.example_index, batch, minus_inf)
    support_term = torch.logsumexp(padded_ll, -1) - bits * LOG2
    support_words, valid = pad_by_example(pack_bits(distribution.z_rows), distribution.example_index, batch, 0)
    per_pass = max(1, pass_rows // batch)
    terms = []
    for start in range(0, num_samples, per_pass):
        count = min(per_pass, num_samples - start)
        dtype = support_log_likelihood.dtype
        z = torch.randint(0, 2, (batch, count, bits), generator=generator, device=images.device).to(dtype)
        log_likelihood = model.log_likelihood(z.reshape(-1, bits), images.repeat_interleave(count, 0))
        matches = (pack_bits(z).unsqueeze(2) == support_words.unsqueeze(1)).all(-1)  # [B, n, K]
        in_support = (matches & valid.unsqueeze(1)).any(-1)  # [B, n]
        terms.append(log_likelihood.reshape(batch, count).masked_fill(in_support, minus_inf))
    return support_term, torch.cat(terms, 1)


def most_probable_rows(distribution: SparseDistribution) -> Tensor:
    """The most probable row of each example of a sparse distribution, ``[B, D]``."""
    probs, _ = pad_by_example(distribution.probs, distribution.example_index, distribution.num_examples, -1.0)
    rows, _ = pad_by_example(distribution.z_rows, distribution.example_index, distribution.num_examples, 0.0)
    best = probs.argmax(-1)
    return rows[torch.arange(distribution.num_examples, device=rows.device), best]


