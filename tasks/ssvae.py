"""Semi-supervised VAE on MNIST (Kingma et al. 2014 M2; Correia et al. 2020, section 3.1 of PAPER_SETUP.md).

Shapes: ``B_l`` labelled and ``B_u`` unlabelled images per step, ``P = 784`` pixels, ``K = 10`` classes,
``R`` (image, class) rows evaluated by the decoder.

**Data.** MNIST train is split into 5,000 labelled / 45,000 unlabelled / 10,000 validation images by the paper's
split files (``<root>/ssvae-splits/*.npy``, read from the same data root as the MNIST files). Without them the
split is a random permutation seeded by ``split_seed`` with the same proportions (1/12, 9/12, 2/12: exactly
5,000 / 45,000 / 10,000 for 60,000 images). Test is the 10,000 MNIST test images. Images stay uint8 on the device
and are binarized dynamically per batch (``P(pixel = 1) = value / 255``). ``train_limit`` keeps the first
``train_limit`` training images (labelled + unlabelled together), in the same labelled/unlabelled proportion (at
least one of each); ``eval_limit`` keeps the first ``eval_limit`` validation / test images.

**Batches.** An epoch is one shuffled pass over the unlabelled set in batches of ``batch_size``; each unlabelled
batch is paired with the next labelled batch of the same size from a shuffled labelled stream that restarts
(reshuffled) whenever it is exhausted. With ``labelled_only`` (the warm start) an epoch is one pass over the
labelled set and no unlabelled batch is drawn.

**Loss of one step** (all per-example terms are averaged over their batch):

- Labelled part, for an image ``x`` with known class ``y``::

      labelled_loss = [-log p(x|y,h) + KL(q(h|x,y) || N(0,I)) + log K] + classification_loss(scores(x), y)

  (the bracket is the -ELBO of ``log p(x, y)``, with ``h`` reparameterised; ``log K = -log p(y)`` is a constant).
  ``classification_loss`` is the negative log-likelihood (cross-entropy of the softmax) or, when the estimator is
  ``sparsemax`` (or ``classification_loss="sparsemax"``), the sparsemax loss of Martins & Astudillo (2016).
- Unlabelled part: the estimator gets the classifier scores ``[B_u, K]`` and one ``loss_fn(z_rows [R, K],
  example_index [R])`` returning ``ell(x, z) = -log p(x|z,h) + KL(q(h|x,z) || N(0,I))`` per row (``h``
  reparameterised, ``x = x_u[example_index]``; only the rows the estimator asks for are evaluated). Since
  ``-log p(z) = log K`` and ``E_pi[log pi] = -H(pi)``::

      -ELBO(x)        = E_pi[ell(x, z)] + log K - H(pi)                 (metric ``neg_elbo``)
      unlabelled_loss = surrogate + log K - entropy_coef * entropy      (what is backpropagated)

  with ``surrogate``, ``entropy`` from the estimator's result; ``entropy_coef = 1`` is the ELBO. For the Gumbel
  estimators (entropy of the discrete ``softmax(scores)``) the last two terms are ``KL(Cat(softmax) || uniform)``,
  the paper's replacement of the KL term.
- Total: ``loss = labelled_loss + (N_u / N_l) * unlabelled_loss`` with ``N_u``, ``N_l`` the sizes of the
  unlabelled and labelled training sets (9 for the paper's split), as in the paper's code. With ``labelled_only``
  the loss is ``labelled_loss``.

**Evaluation** (``evaluate``): ``accuracy`` of the classifier's argmax; ``neg_elbo``, the -ELBO above with the
*exact* expectation over the 10 classes: under the estimator's own distribution when it has one
(:func:`~lvzoo.estimators.base.exact_distribution`: softmax / sparsemax / entmax15 / any third-party exact
estimator; evaluated with the estimator itself, which is exact), and under
``softmax(scores)`` for the Monte-Carlo and relaxed estimators; ``decoder_calls``, the mean support of the
estimator run in eval mode (the estimator's state is restored afterwards). Images are binarized and ``h`` is
sampled (one reparameterised draw per row) from a generator seeded with ``eval_seed``, so repeated evaluations of
the same model agree. ``final`` changes nothing: the test protocol is the same as validation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from entmax import sparsemax_loss
from matplotlib.figure import Figure
from torch import Tensor, nn

from lvzoo.estimators.base import Estimator, LossFn, exact_distribution, marginalize
from lvzoo.estimators.marginal import all_rows
from lvzoo.estimators.spaces import Categorical
from lvzoo.estimators.validators import non_negative_int, one_of, positive_int
from lvzoo.models.ssvae import SSVAEModel
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
from lvzoo.tasks.data import binarize, find_root, minibatch_indices
from lvzoo.tasks.ssvae_data import SSVAEData, load_model_state, load_ssvae_data

NUM_CLASSES = 10

#: The warm start (``labelled_only``) uses lr 1e-3 for every estimator.
WARM_START_LR = 1e-3
#: Gumbel temperature schedule tau = max(0.5, exp(-decay_rate * t)), updated every ``update_every`` steps.
_GUMBEL: Mapping[str, Any] = {"decay_rate": 1e-4, "update_every": 1000}
#: The paper's settings per estimator (PAPER_SETUP.md 3.1: its scripts' learning rates, batch 64, entropy
#: coefficient 1 = the ELBO; sparsemax trains its classifier with the sparsemax loss; Gumbel schedule r = 1e-4 every
#: 1000 steps); estimators outside the table get ``DEFAULT_SETTINGS``.
PAPER_SETTINGS: Mapping[str, PaperSettings] = {
    "sfe": PaperSettings(task={"lr": 1e-4}),
    "sfe+": PaperSettings(task={"lr": 1e-4}),
    "nvil": PaperSettings(task={"lr": 1e-3}),
    "sumsample": PaperSettings(task={"lr": 1e-3}),
    "gumbel": PaperSettings(task={"lr": 1e-3}, estimator=_GUMBEL),
    "stgumbel": PaperSettings(task={"lr": 1e-3}, estimator=_GUMBEL),
    "softmax": PaperSettings(task={"lr": 1e-3}),
    "sparsemax": PaperSettings(task={"lr": 5e-4, "classification_loss": "sparsemax"}),
}
DEFAULT_SETTINGS = PaperSettings(task={"lr": 1e-3})
CLASSIFICATION_LOSSES = ("nll", "sparsemax")


def _bool(instance: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be True or False, got {value!r}")


def _optional_path(instance: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{attribute.name} must be a non-empty path string or None, got {value!r}")


@attrs.frozen
class SSVAEConfig(TaskConfig):
    """Semi-supervised VAE settings (see the module docstring).

    ``labelled_only``: warm start, train on the labelled set only (paper: 100 epochs, lr 1e-3).
    ``init_checkpoint``: weights to start from (a runner checkpoint with key ``"model"``, or a bare state_dict).
    ``vae_layers``: hidden layers of the encoder and decoder (2 as in the paper's code; the text says 1).
    ``classification_loss``: of the labelled classifier, ``nll`` or ``sparsemax`` (the paper's, for the sparsemax
    estimator).
    """

    labelled_only: bool = attrs.field(default=False, validator=_bool)
    init_checkpoint: str | None = attrs.field(default=None, validator=_optional_path)
    latent_dim: int = attrs.field(default=8, validator=positive_int)
    classifier_hidden: int = attrs.field(default=256, validator=positive_int)
    classifier_layers: int = attrs.field(default=3, validator=positive_int)
    vae_hidden: int = attrs.field(default=128, validator=positive_int)
    vae_layers: int = attrs.field(default=2, validator=positive_int)
    classification_loss: str = attrs.field(default="nll", validator=one_of(*CLASSIFICATION_LOSSES))
    split_seed: int = attrs.field(default=0, validator=non_negative_int)
    eval_batch_size: int = attrs.field(default=500, validator=positive_int)
    eval_seed: int = attrs.field(default=0, validator=non_negative_int)


@attrs.frozen
class SSVAEBatch:
    """Binarized images on the device: ``labelled_x [B_l, P]``, ``labels [B_l]`` and ``unlabelled_x [B_u, P]``
    (``None`` in the labelled-only warm start)."""

    labelled_x: Tensor
    labels: Tensor
    unlabelled_x: Tensor | None


@attrs.frozen
class LabelledTerms:
    """Per-example labelled terms ``[B_l]``: the -ELBO of ``log p(x, y)`` and the classification loss;
    ``scores [B_l, K]``."""

    neg_elbo: Tensor
    classification: Tensor
    scores: Tensor


def _neg_elbo(terms: LatentTerms) -> dict[str, Tensor]:
    return {"neg_elbo": terms.bound.mean()}


class SSVAETask(Task[SSVAEConfig]):
    """The M2 semi-supervised VAE on MNIST with a categorical class latent (``Categorical(10)``)."""

    config_class = SSVAEConfig
    default_epochs = 200
    paper_estimators = ("sfe", "sfe+", "nvil", "sumsample", "gumbel", "stgumbel", "softmax", "sparsemax")
    paper_seeds = tuple(range(43, 53))
    selection_metric = ("val_neg_elbo", "min")

    @classmethod
    def paper_settings(cls, estimator: str, config: SSVAEConfig) -> PaperSettings:
        """:data:`PAPER_SETTINGS` of ``estimator``; the warm start (``labelled_only``) uses ``WARM_START_LR``."""
        settings = PAPER_SETTINGS.get(estimator, DEFAULT_SETTINGS)
        if config.labelled_only:
            return attrs.evolve(settings, task={**settings.task, "lr": WARM_START_LR})
        return settings

    def __init__(self, config: SSVAEConfig, data_dir: Path | None, device: torch.device) -> None:
        super().__init__(config, data_dir, device)
        self._data: SSVAEData | None = None

    # ----------------------------------------------------------------------------------------------- interface
    def latent_space(self) -> Categorical:
        """``Categorical(10)``: the digit class."""
        return Categorical(NUM_CLASSES)

    def build_model(self) -> SSVAEModel:
        """A fresh :class:`SSVAEModel`, loaded from ``init_checkpoint`` when one is configured."""
        config = self.config
        model = SSVAEModel(
            num_classes=NUM_CLASSES,
            latent_dim=config.latent_dim,
            classifier_hidden=config.classifier_hidden,
            classifier_layers=config.classifier_layers,
            vae_hidden=config.vae_hidden,
            vae_layers=config.vae_layers,
        )
        if config.init_checkpoint is not None:
            path = Path(config.init_checkpoint)
            try:
                model.load_state_dict(load_model_state(path))
            except RuntimeError as exc:  # missing / unexpected keys or shape mismatches
                raise ValueError(
                    f"init_checkpoint {str(path)!r} does not fit the ssvae model of this config: {exc}"
                ) from exc
        return model

    def dataset_description(self) -> dict[str, Any]:
        """MNIST as this run uses it (the paper's labelled / unlabelled / validation splits, limits applied)."""
        data = self.data
        return {
            "name": "MNIST",
            "digest": tensor_digest(*attrs.astuple(data, recurse=False)),
            "source": str(find_root("MNIST", self.data_dir, download=False)),
            "splits": {
                "labelled": int(data.labelled_images.shape[0]),
                "unlabelled": int(data.unlabelled_images.shape[0]),
                "val": int(data.val_images.shape[0]),
                "test": int(data.test_images.shape[0]),
            },
        }

    @property
    def data(self) -> SSVAEData:
        """The splits, loaded on first use."""
        if self._data is None:
            config = self.config
            self._data = load_ssvae_data(
                self.data_dir, config.split_seed, config.train_limit, config.eval_limit, self.device
            )
        return self._data

    def train_batches(self, generator: torch.Generator) -> Iterator[SSVAEBatch]:
        """One epoch (see the module docstring); indices shuffled with ``generator``, binarized on the device."""
        data = self.data
        num_labelled = data.labelled_labels.shape[0]
        if self.config.labelled_only:
            for index in minibatch_indices(num_labelled, self.config.batch_size, generator, self.device):
                yield SSVAEBatch(binarize(data.labelled_images[index]), data.labelled_labels[index], None)
            return
        labelled_stream = self._cycle(num_labelled, generator)
        for unlabelled_index in minibatch_indices(
            data.unlabelled_images.shape[0], self.config.batch_size, generator, self.device
        ):
            index = next(labelled_stream)
            yield SSVAEBatch(
                labelled_x=binarize(data.labelled_images[index]),
                labels=data.labelled_labels[index],
                unlabelled_x=binarize(data.unlabelled_images[unlabelled_index]),
            )

    def steps_per_epoch(self) -> int:
        """Unlabelled batches per epoch (labelled batches in the warm start)."""
        data = self.data
        count = data.labelled_labels.shape[0] if self.config.labelled_only else data.unlabelled_images.shape[0]
        return math.ceil(count / self.config.batch_size)

    def objective(self, model: nn.Module, batch: SSVAEBatch) -> BatchObjective:
        """The loss of the module docstring: the labelled loss, plus the unlabelled -ELBO (the latent part, weighted
        by :meth:`unlabelled_weight`) unless labelled only (then one decoder call per labelled image)."""
        ssvae = self._check_model(model)
        labelled = self.labelled_terms(ssvae, batch.labelled_x, batch.labels)
        labelled_loss = (labelled.neg_elbo + labelled.classification).mean()
        metrics: dict[str, Tensor] = {
            "labelled_loss": labelled_loss.detach(),
            "labelled_neg_elbo": labelled.neg_elbo.detach().mean(),
            "classification_loss": labelled.classification.detach().mean(),
            "accuracy": (labelled.scores.argmax(-1) == batch.labels).float().mean().detach(),
        }
        if batch.unlabelled_x is None:
            return BatchObjective(None, labelled_loss, metrics, support=torch.ones_like(batch.labels))
        latent = attrs.evolve(self.unlabelled_problem(ssvae, batch.unlabelled_x), weight=self.unlabelled_weight())
        return BatchObjective(latent, labelled_loss, metrics, result_metrics=_neg_elbo)

    def evaluate(
        self, model: nn.Module, estimator: Estimator[Any], split: Literal["val", "test"], final: bool = False
    ) -> dict[str, float]:
        """``accuracy``, exact ``neg_elbo`` and ``decoder_calls`` per example on ``split`` (module docstring)."""
        ssvae = self._check_model(model)
        data = self.data
        if split == "val":
            images, labels = data.val_images, data.val_labels
        elif split == "test":
            images, labels = data.test_images, data.test_labels
        else:
            raise ValueError(f"unknown split {split!r}; accepted: val, test")
        generator = torch.Generator(device=self.device).manual_seed(self.config.eval_seed)
        saved_state = {name: value.clone() for name, value in estimator.state_dict().items()}
        correct = torch.zeros((), device=self.device)
        neg_elbo = torch.zeros((), device=self.device)
        decoder_calls = torch.zeros((), device=self.device)
        with evaluation_mode(ssvae, estimator):
            for index in minibatch_indices(labels.shape[0], self.config.eval_batch_size, None, self.device):
                x = binarize(images[index], generator)
                scores = ssvae.classify(x)
                correct += (scores.argmax(-1) == labels[index]).sum()
                posterior = exact_distribution(estimator, scores)
                under = all_rows(torch.softmax(scores, -1), self.latent_space()) if posterior is None else posterior
                result = marginalize(under, self.row_loss(ssvae, x, generator=generator))
                neg_elbo += (result.objective + ssvae.log_num_classes() - result.entropy).sum()
                if posterior is None:
                    result = estimator(scores, self.row_loss(ssvae, x, generator=generator), x)
                decoder_calls += result.support.sum()
        estimator.load_state_dict(saved_state)
        count = labels.shape[0]
        return {
            "accuracy": float(correct) / count,
            "neg_elbo": float(neg_elbo) / count,
            "decoder_calls": float(decoder_calls) / count,
        }

    def save_artifacts(self, model: nn.Module, estimator: Estimator[Any], out_dir: Path) -> list[Path]:
        """``ssvae_samples.png``: 8 validation images, their reconstructions (argmax class, mean ``h``) and, per
        class, 8 samples of ``p(x | z, h)`` (pixel probabilities, ``h ~ N(0, I)``)."""
        ssvae = self._check_model(model)
        columns = min(8, self.data.val_images.shape[0])
        generator = torch.Generator(device=self.device).manual_seed(self.config.eval_seed)
        with torch.no_grad():
            x = binarize(self.data.val_images[:columns], generator)
            z = F.one_hot(ssvae.classify(x).argmax(-1), NUM_CLASSES).to(x.dtype)
            mu, _ = ssvae.encode(x, z)
            reconstruction = torch.sigmoid(ssvae.decode(mu, z))
            classes = torch.arange(NUM_CLASSES, device=self.device).repeat_interleave(columns)
            z_prior = F.one_hot(classes, NUM_CLASSES).to(x.dtype)
            h = torch.randn(z_prior.shape[0], ssvae.latent_dim, generator=generator, device=self.device)
            samples = torch.sigmoid(ssvae.decode(h, z_prior))
        rows = torch.cat([x, reconstruction, samples]).reshape(-1, columns, 28, 28)
        grid = rows.permute(0, 2, 1, 3).reshape(rows.shape[0] * 28, columns * 28).cpu().numpy()
        figure = Figure(figsize=(columns * 0.6, rows.shape[0] * 0.6))
        axes = figure.add_subplot()
        axes.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0)
        axes.set_yticks([14 + 28 * i for i in range(rows.shape[0])])
        axes.set_yticklabels(["data", "recon"] + [f"z={k}" for k in range(NUM_CLASSES)])
        axes.set_xticks([])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "ssvae_samples.png"
        figure.savefig(path, bbox_inches="tight", dpi=100)
        return [path]

    # ------------------------------------------------------------------------------------------------- losses
    def row_loss(
        self, model: SSVAEModel, x: Tensor, *, sample_h: bool = True, generator: torch.Generator | None = None
    ) -> LossFn:
        """The estimator's ``loss_fn``: ``(z_rows [R, K], example_index [R]) -> ell(x[example_index], z) [R]``."""

        def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
            return model.neg_elbo_given_class(
                x[example_index], z_rows.to(x.dtype), sample_h=sample_h, generator=generator
            )

        return loss_fn

    def unlabelled_problem(
        self, model: SSVAEModel, x: Tensor, *, sample_h: bool = True, generator: torch.Generator | None = None
    ) -> LatentProblem:
        """The latent part of unlabelled images ``x [B_u, P]``: classifier scores, :meth:`row_loss` and the prior
        term ``log K`` (so that ``E[loss] + log K - H`` is the -ELBO)."""
        loss_fn = self.row_loss(model, x, sample_h=sample_h, generator=generator)
        return LatentProblem(model.classify(x), loss_fn, x, prior=model.log_num_classes())

    def labelled_terms(self, model: SSVAEModel, x: Tensor, labels: Tensor) -> LabelledTerms:
        """-ELBO with the known class and the classification loss for ``x [B_l, P]``, ``labels [B_l]``."""
        scores = model.classify(x)
        z = F.one_hot(labels, NUM_CLASSES).to(x.dtype)
        neg_elbo = model.neg_elbo_given_class(x, z) + model.log_num_classes()
        if self.config.classification_loss == "sparsemax":
            classification: Tensor = sparsemax_loss(scores, labels)
        else:
            classification = F.cross_entropy(scores, labels, reduction="none")
        return LabelledTerms(neg_elbo=neg_elbo, classification=classification, scores=scores)

    def unlabelled_weight(self) -> float:
        """``N_u / N_l``: the weight of the mean unlabelled loss in the total."""
        data = self.data
        return data.unlabelled_images.shape[0] / data.labelled_labels.shape[0]

    # ------------------------------------------------------------------------------------------------ helpers
    def _cycle(self, count: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Endless shuffled batches ``[batch_size]`` of indices into ``count`` items, reshuffled every pass."""
        while True:
            yield from minibatch_indices(count, self.config.batch_size, generator, self.device)

    @staticmethod
    def _check_model(model: nn.Module) -> SSVAEModel:
        if not isinstance(model, SSVAEModel):
            raise TypeError(f"the ssvae task needs an SSVAEModel, got {type(model).__name__}")
        return model
