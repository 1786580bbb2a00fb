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

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import (
    Estimator,
    LossFn,
    evaluate_rows,
    exact_distribution,
    expectation,
)
from lvzoo.estimators.spaces import BitVector, check_budget
from lvzoo.estimators.validators import positive_int
from lvzoo.models.bitvec import PIXELS, BitVectorVAEModel
from lvzoo.tasks.base import (
    BatchObjective,
    LatentProblem,
    LatentTerms,
    PaperSettings,
    Task,
    TaskConfig,
    evaluation_mode,
    tensor_digest,
)
from lvzoo.tasks.bitvec_nll import (
    LOG2,
    bernoulli_entropy,
    bernoulli_importance_samples,
    log_mean_exp,
    most_probable_rows,
    sparse_log_marginal_terms,
)
from lvzoo.tasks.data import find_root, load_images, minibatch_indices

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
        check_budget(value, self.bits, "bits")


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


# ---------------------------------------------------------------------------------------------------------------


class BitVectorVAETask(Task[BitVectorVAEConfig]):
    """The bit-vector VAE task (see the module docstring); batches are uint8 images ``[B, 784]`` on the device."""

    config_class = BitVectorVAEConfig
    default_epochs = 100
    paper_estimators = ("sfe", "sfe+", "nvil", "gumbel", "stgumbel", "topksparse", "sparsemap")
    paper_seeds = (42,)
    selection_metric = ("val_neg_elbo", "min")

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

    def dataset_description(self) -> dict[str, Any]:
        """Fashion-MNIST as this run uses it (limits applied): split sizes and the digest of the images."""
        data = self._data()
        return {
            "name": "FashionMNIST",
            "digest": tensor_digest(*data.values()),
            "source": str(find_root("FashionMNIST", self.data_dir, download=False)),
            "splits": {name: int(images.shape[0]) for name, images in data.items()},
        }

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

    def objective(self, model: nn.Module, batch: Tensor) -> BatchObjective:
        """The -ELBO ``mean(surrogate + D log 2 - entropy_coef * entropy)`` of uint8 images ``batch [B, 784]``;
        metrics ``neg_elbo``, ``rate`` and ``distortion``."""
        vae = as_bitvec_model(model)
        scores = vae.encode(batch)
        prior_term = self.config.bits * LOG2

        def elbo_metrics(terms: LatentTerms) -> dict[str, Tensor]:
            return {
                "neg_elbo": terms.bound.mean(),
                "rate": (prior_term - terms.result.entropy.detach()).mean(),
                "distortion": terms.result.objective.mean(),
            }

        latent = LatentProblem(scores, distortion_fn(vae, batch), batch.to(scores.dtype) / 255.0, prior=prior_term)
        return BatchObjective(latent, result_metrics=elbo_metrics)

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
        with evaluation_mode(vae, estimator):
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
        with evaluation_mode(vae, estimator):
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


__all__ = ["BitVectorVAEConfig", "BitVectorVAETask", "distortion_fn"]
