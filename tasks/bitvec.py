"""Bit-vector VAE on Fashion-MNIST (Correia et al. 2020, Sec. 5.3; ``../shared/PAPER_SETUP.md`` Sec. 3.3).

A ``D``-bit latent ``z`` (``D`` in {32, 128}, optionally with at most ``budget`` bits on) with a uniform prior
``p(z) = 2^-D``, an encoder giving bit scores ``t [B, D]`` and a decoder with an independent 256-way categorical
per pixel (:class:`lvzoo.models.bitvec.BitVectorVAEModel`). The estimator is called with the scores and the
distortion ``loss_fn(z_rows, example_index) = -log p(x | z)``; per example

    -ELBO = E_q[-log p(x|z)] + D log 2 - H(q)      (rate = KL(q || p) = D log 2 - H(q)),

with ``H`` the exact entropy of the sparse ``q`` for the marginalizing estimators (``topksparse``, ``sparsemap``, any
:class:`~lvzoo.estimators.base.MarginalizingEstimator`) and the analytic Bernoulli entropy for the sampling and
relaxed estimators. The training loss is the batch mean of
``surrogate + D log 2 - entropy_coef * entropy`` (``entropy_coef = 1`` is the ELBO).

Data: the first 55,000 training images train, the last 5,000 validate (the paper's code; the paper's text says
"the last 10,000"), the 10,000 test images test. Images stay uint8 ``[N, 784]`` on the device.

Held-out negative log-likelihood, in bits per dimension ``-log p(x) / (784 ln 2)``:

- factorised Bernoulli posteriors (every estimator that does not marginalize): importance sampling with ``q`` as the
  proposal, ``log p(x) ~= logmeanexp_s [log p(x|z_s) + log p(z_s) - log q(z_s|x)]``, ``z_s ~ q``;
- sparse posteriors (a :class:`~lvzoo.estimators.base.MarginalizingEstimator`):
  ``p(x) = sum_{z in S} p(z) p(x|z) + E_{z ~ p}[1(z not in S) p(x|z)]`` with ``S`` the posterior's support; the
  first sum is exact, the second is estimated with samples from the uniform prior whose draws that land in ``S``
  count zero (no double counting); the two are combined by log-sum-exp.

The sparse posterior is the estimator's own ``distribution(scores)``; its rows' losses are computed once and give
both the exact distortion and entropy (:func:`~lvzoo.estimators.base.expectation`) and the exact support term.
The prior stays uniform over all ``2^D`` vectors when a budget restricts the posterior (as in the paper's code).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvzoo.estimators.base import (
    Estimator,
    LossFn,
    SparseDistribution,
    evaluate_rows,
    exact_distribution,
    expectation,
)
from lvzoo.estimators.spaces import BitVector
from lvzoo.estimators.validators import positive_int
from lvzoo.models.bitvec import PIXELS, BitVectorVAEModel
from lvzoo.tasks.base import PaperSettings, StepOutput, Task, TaskConfig
from lvzoo.tasks.data import load_images, minibatch_indices

LOG2 = math.log(2.0)
#: Images at the end of the training file that form the validation split (the paper's code: 55,000-59,999).
VALIDATION_SIZE = 5000
#: Seed of the importance-sampling draws of :meth:`BitVectorVAETask.evaluate` (same draws at every evaluation).
EVAL_SEED = 1234
#: Steps between Gumbel temperature updates (``tau = max(0.5, exp(-r t))``).
PAPER_UPDATE_EVERY = 1000
#: Top-k sparsemax's ``k``.
PAPER_TOPK = 10


def _settings(lr: float, batch_size: int = 64, **estimator: Any) -> PaperSettings:
    return PaperSettings(task={"lr": lr, "batch_size": batch_size}, estimator=estimator)


def _gumbel(lr: float, decay_rate: float) -> PaperSettings:
    return _settings(lr, decay_rate=decay_rate, update_every=PAPER_UPDATE_EVERY)


#: The paper's settings per estimator, ``(D = 32, D = 128)`` (PAPER_SETUP.md 3.3): learning rates, batch 16 for
#: SparseMAP at D = 128, Gumbel decay rates ``r``, top-k's k. ``sumsample`` is not in the paper's table (SFE's
#: settings are used); other estimators get ``DEFAULT_SETTINGS``.
PAPER_SETTINGS: dict[str, tuple[PaperSettings, PaperSettings]] = {
    "sfe": (_settings(1e-3), _settings(1e-3)),
    "sfe+": (_settings(1e-3), _settings(1e-3)),
    "nvil": (_settings(1e-3), _settings(5e-4)),
    "sumsample": (_settings(1e-3), _settings(1e-3)),
    "gumbel": (_gumbel(1e-3, 1e-5), _gumbel(1e-3, 1e-4)),
    "stgumbel": (_gumbel(1e-3, 1e-5), _gumbel(5e-4, 1e-5)),
    "topksparse": (_settings(2e-3, k=PAPER_TOPK), _settings(1e-3, k=PAPER_TOPK)),
    "sparsemap": (_settings(2e-3), _settings(2e-3, batch_size=16)),
}
DEFAULT_SETTINGS = _settings(1e-3)
#: Images shown by :meth:`BitVectorVAETask.save_artifacts`.
ARTIFACT_IMAGES = 8


@attrs.frozen
class BitVectorVAEConfig(TaskConfig):
    """Bit-vector VAE settings.

    ``bits``: latent width D (the paper uses 32 and 128). ``budget``: at most this many bits on (``None``: no
    budget; the paper's budgeted SparseMAP uses D/2); must be in [1, bits]. ``is_samples``: importance samples per
    example at validation; ``final_is_samples``: at the final test (the paper: 1024). ``likelihood_chunk``: decoder
    rows per chunk of the 256-way log-partition (memory ~ ``likelihood_chunk * 784 * 256`` floats).
    ``is_pass_rows``: decoder rows per importance-sampling pass. ``eval_batch_size``: examples per evaluation batch.
    """

    bits: int = attrs.field(default=32, validator=positive_int)
    budget: int | None = attrs.field(default=None)
    is_samples: int = attrs.field(default=16, validator=positive_int)
    final_is_samples: int = attrs.field(default=1024, validator=positive_int)
    likelihood_chunk: int = attrs.field(default=256, validator=positive_int)
    is_pass_rows: int = attrs.field(default=8192, validator=positive_int)
    eval_batch_size: int = attrs.field(default=100, validator=positive_int)

    @budget.validator
    def _check_budget(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.bits:
            raise ValueError(f"budget must be None or an int in [1, bits={self.bits}], got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Posterior helpers (module-level so tests can check them against exact enumeration)


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


def as_bitvec_model(model: nn.Module) -> BitVectorVAEModel:
    """``model`` typed as the bit-vector VAE (``TypeError`` otherwise)."""
    if not isinstance(model, BitVectorVAEModel):
        raise TypeError(f"the bitvec task needs a BitVectorVAEModel, got {type(model).__name__}")
    return model


def distortion_fn(model: BitVectorVAEModel, images: Tensor) -> LossFn:
    """The estimator's loss: ``-log p(images[i] | z)`` for rows ``z_rows [R, D]`` and ``example_index [R]``."""

    def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
        return -model.log_likelihood(z_rows, images[example_index])

    return loss_fn


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode and restore each one's training flag afterwards."""
    flags = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.train(flag)


# ---------------------------------------------------------------------------------------------------------------


class BitVectorVAETask(Task[BitVectorVAEConfig]):
    """The bit-vector VAE task (see the module docstring); batches are uint8 images ``[B, 784]`` on the device."""

    config_class = BitVectorVAEConfig
    default_epochs = 100
    paper_estimators = ("sfe", "sfe+", "nvil", "gumbel", "stgumbel", "topksparse", "sparsemap")
    paper_seeds = (42,)

    def __init__(self, config: BitVectorVAEConfig, data_dir: Path | None, device: torch.device) -> None:
        super().__init__(config, data_dir, device)
        self._splits: dict[str, Tensor] | None = None

    # -- data -----------------------------------------------------------------------------------------------
    def _data(self) -> dict[str, Tensor]:
        """uint8 ``[N, 784]`` images on the device per split (loaded once; ``train_limit``/``eval_limit`` applied)."""
        if self._splits is None:
            train_file, _ = load_images("FashionMNIST", "train", self.data_dir)
            test_file, _ = load_images("FashionMNIST", "test", self.data_dir)
            if train_file.shape[0] <= VALIDATION_SIZE:
                raise ValueError(
                    f"the FashionMNIST training file has {train_file.shape[0]} images; more than "
                    f"{VALIDATION_SIZE} are needed (the last {VALIDATION_SIZE} validate)"
                )
            train_file, test_file = train_file.reshape(-1, PIXELS), test_file.reshape(-1, PIXELS)
            splits = {
                "train": train_file[:-VALIDATION_SIZE][: self.config.train_limit],
                "val": train_file[-VALIDATION_SIZE:][: self.config.eval_limit],
                "test": test_file[: self.config.eval_limit],
            }
            self._splits = {name: images.to(self.device) for name, images in splits.items()}
        return self._splits

    # -- Task interface -------------------------------------------------------------------------------------
    @classmethod
    def paper_variants(cls, config: BitVectorVAEConfig) -> dict[str, tuple[str, dict[str, Any]]]:
        """SparseMAP with the paper's budget B = D/2."""
        return {"sparsemap-budget": ("sparsemap", {"budget": config.bits // 2})}

    def latent_space(self) -> BitVector:
        """``BitVector(bits, budget)``."""
        return BitVector(self.config.bits, self.config.budget)

    @classmethod
    def paper_settings(cls, estimator: str, config: BitVectorVAEConfig) -> PaperSettings:
        """:data:`PAPER_SETTINGS` of ``estimator`` at the paper's D nearest to ``bits`` (32 or 128).

        Estimators outside the paper's table get lr 0.001, batch 64 and their own default configuration.
        """
        column = 0 if abs(config.bits - 32) <= abs(config.bits - 128) else 1
        return PAPER_SETTINGS.get(estimator, (DEFAULT_SETTINGS, DEFAULT_SETTINGS))[column]

    def encoder_input_dim(self) -> int:
        """784 pixels."""
        return PIXELS

    def build_model(self) -> nn.Module:
        """A fresh :class:`BitVectorVAEModel` with ``bits`` latent bits."""
        return BitVectorVAEModel(self.config.bits, chunk_rows=self.config.likelihood_chunk)

    def train_batches(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Shuffled uint8 ``[B, 784]`` batches of the training split (the last one may be smaller)."""
        images = self._data()["train"]
        for index in minibatch_indices(images.shape[0], self.config.batch_size, generator, self.device):
            yield images[index]

    def steps_per_epoch(self) -> int:
        """``ceil(train images / batch size)``."""
        return -(-self._data()["train"].shape[0] // self.config.batch_size)

    def train_step(self, model: nn.Module, estimator: Estimator[Any], batch: Tensor) -> StepOutput:
        """Loss ``mean(surrogate + D log 2 - entropy_coef * entropy)`` of uint8 images ``batch [B, 784]``."""
        vae = as_bitvec_model(model)
        scores = vae.encode(batch)
        result = estimator(scores, distortion_fn(vae, batch), batch.to(scores.dtype) / 255.0)
        prior_term = self.config.bits * LOG2
        loss = (result.surrogate + prior_term - self.config.entropy_coef * result.entropy).mean()
        entropy = result.entropy.detach()
        support = result.support.to(scores.dtype)
        metrics = {
            "loss": loss.detach(),
            "neg_elbo": (result.objective + prior_term - entropy).mean(),
            "rate": (prior_term - entropy).mean(),
            "distortion": result.objective.mean(),
            "support_mean": support.mean(),
            "support_median": support.median(),
        }
        metrics.update({f"estimator_{key}": value.detach() for key, value in result.logs.items()})
        return StepOutput(loss=loss, metrics=metrics, support=result.support)

    def evaluate(
        self, model: nn.Module, estimator: Estimator[Any], split: Literal["val", "test"], final: bool = False
    ) -> dict[str, float]:
        """-ELBO, rate, distortion (nats per example), NLL (nats and bits/dim) and decoder calls on ``split``.

        Importance sampling uses ``final_is_samples`` samples per example when ``final`` else ``is_samples``, drawn
        from a generator seeded with :data:`EVAL_SEED`. Model and estimator run in eval mode (restored after).
        """
        if split not in ("val", "test"):
            raise ValueError(f"unknown split {split!r}; accepted: val, test")
        vae = as_bitvec_model(model)
        images = self._data()[split]
        num_samples = self.config.final_is_samples if final else self.config.is_samples
        generator = torch.Generator(device=self.device).manual_seed(EVAL_SEED)
        per_example: list[Tensor] = []  # [5, b] each: neg_elbo, rate, distortion, log p(x), support
        with eval_mode(vae, estimator), torch.no_grad():
            for index in minibatch_indices(images.shape[0], self.config.eval_batch_size, None, self.device):
                per_example.append(self._evaluate_batch(vae, estimator, images[index], num_samples, generator))
        neg_elbo, rate, distortion, log_marginal, support = torch.cat(per_example, 1)
        nll = -log_marginal.mean()
        summary = torch.stack(
            [
                neg_elbo.mean(),
                rate.mean(),
                distortion.mean(),
                nll,
                nll / (PIXELS * LOG2),
                support.mean(),
                support.median(),
            ]
        ).tolist()
        names = ["neg_elbo", "rate", "distortion", "nll", "bits_per_dim", "decoder_calls", "decoder_calls_median"]
        return dict(zip(names, summary, strict=True))

    def _evaluate_batch(
        self,
        model: BitVectorVAEModel,
        estimator: Estimator[Any],
        images: Tensor,
        num_samples: int,
        generator: torch.Generator,
    ) -> Tensor:
        """``[5, b]``: -ELBO, rate, distortion, log p(x) estimate and decoder calls per example of ``images``."""
        scores = model.encode(images)
        prior_term = self.config.bits * LOG2
        loss_fn = distortion_fn(model, images)
        pass_rows = self.config.is_pass_rows
        posterior = exact_distribution(estimator, scores)
        if posterior is not None:
            losses = evaluate_rows(loss_fn, posterior.z_rows, posterior.example_index)
            result = expectation(posterior, losses)
            distortion, entropy, support = result.objective, result.entropy, result.support
            support_term, complement = sparse_log_marginal_terms(
                model, posterior, -losses, images, num_samples, generator, pass_rows
            )
            log_marginal = torch.logaddexp(support_term, log_mean_exp(complement, -1))
        else:
            support = estimator(scores, loss_fn, images.to(scores.dtype) / 255.0).support
            log_likelihood, log_weights = bernoulli_importance_samples(
                model, scores, images, num_samples, generator, pass_rows
            )
            distortion, entropy = -log_likelihood.mean(-1), bernoulli_entropy(scores)
            log_marginal = log_mean_exp(log_weights, -1)
        rate = prior_term - entropy
        return torch.stack([distortion + rate, rate, distortion, log_marginal, support.to(scores.dtype)])

    def save_artifacts(self, model: nn.Module, estimator: Estimator[Any], out_dir: Path) -> list[Path]:
        """``reconstructions.png``: test images (top) and the per-pixel mode of ``p(x | z)`` at the most probable
        ``z`` of the posterior (bottom)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        vae = as_bitvec_model(model)
        images = self._data()["test"][:ARTIFACT_IMAGES]
        with eval_mode(vae, estimator), torch.no_grad():
            scores = vae.encode(images)
            posterior = exact_distribution(estimator, scores)
            modes = most_probable_rows(posterior) if posterior is not None else (scores > 0).to(scores.dtype)
            reconstructions = vae.most_likely_images(modes)
        count = images.shape[0]
        figure, axes = plt.subplots(2, count, figsize=(1.2 * count, 2.6), squeeze=False)
        for column in range(count):
            for row, picture in enumerate((images[column], reconstructions[column])):
                axis = axes[row, column]
                axis.imshow(picture.reshape(28, 28).cpu().numpy(), cmap="gray", vmin=0, vmax=255)
                axis.axis("off")
        axes[0, 0].set_title("data", fontsize=8, loc="left")
        axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "reconstructions.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        return [path]


__all__ = [
    "BitVectorVAEConfig",
    "BitVectorVAETask",
    "bernoulli_entropy",
    "bernoulli_importance_samples",
    "bernoulli_log_prob",
    "distortion_fn",
    "log_mean_exp",
    "most_probable_rows",
    "pack_bits",
    "pad_by_example",
    "sparse_log_marginal_terms",
]
