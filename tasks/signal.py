"""The referential signalling game (paper Sec. 3.2: Lazaridou et al. 2017 with the Havrylov & Titov changes).

The sender sees the target image's features and emits one symbol ``z ~ pi(z | target)`` out of ``vocab_size``
(``Categorical(vocab_size)``); the receiver sees ``num_candidates`` images and ``z`` and must point at the target.
Loss ``l = -log p(target | candidates, z)``; train loss ``mean(surrogate) - entropy_coef * mean(entropy)``.

Data (:mod:`lvzoo.tasks.signal_data`): training games are drawn fresh every epoch from the train images with the
runner's generator (``games_per_epoch``, default 100 batches of 64 as in the paper's code); validation is
``VAL_GAMES`` games from the train images with a fixed seed (as in the paper's code), test ``TEST_GAMES`` games
from the test images with a fixed seed. ``train_limit`` caps the games per epoch, ``eval_limit`` the val/test games.

Evaluation: ``success`` is the fraction of games where the receiver's argmax is the target when the sender sends
the argmax of its scores; ``loss`` the mean estimator objective (the exact expected loss for marginalization, a
Monte-Carlo estimate otherwise); ``decoder_calls`` the decoder calls per game; ``entropy`` the mean entropy of
pi; for marginalizing estimators (:func:`~lvzoo.estimators.base.exact_distribution`) also
``expected_success``, the exact ``E_pi[receiver argmax == target]`` under the estimator's ``distribution(scores)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import Estimator, exact_distribution, marginalize
from lvzoo.estimators.spaces import Categorical, LatentSpace
from lvzoo.estimators.validators import int_at_least, number_in
from lvzoo.models.signal import TRAINING_LOSSES, GameLoss, SignalGameModel, TrainingLoss
from lvzoo.tasks.base import (
    BatchObjective,
    LatentProblem,
    PaperSettings,
    Task,
    TaskConfig,
    evaluation_mode,
    tensor_digest,
)
from lvzoo.tasks.signal_data import (
    MNIST_FASHION_RELU,
    OFFLINE_SOURCES,
    ConceptImages,
    Games,
    draw_games,
    load_concept_images,
)

#: Validation games (fixed seed, train images) and test games (fixed seed, test images), as in the paper's code.
VAL_GAMES = 1024
TEST_GAMES = 10000 // 64 * 64
VAL_SEED = 20200724
TEST_SEED = 20200725

_GUMBEL = {"decay_rate": 1e-5, "update_every": 1000}


def _settings(lr: float, entropy_coef: float, **estimator: Any) -> PaperSettings:
    return PaperSettings(task={"lr": lr, "entropy_coef": entropy_coef, "batch_size": 64}, estimator=estimator)


#: The paper's settings per estimator (its code scripts: lr, entropy coefficient, batch 64, Gumbel schedule r = 1e-5
#: every 1000 steps); estimators outside the table get ``DEFAULT_SETTINGS``.
PAPER_SETTINGS: dict[str, PaperSettings] = {
    "sfe": _settings(1e-3, 0.05),
    "sfe+": _settings(1e-3, 0.05),
    "nvil": _settings(1e-3, 0.1),
    "gumbel": _settings(1e-3, 0.01, **_GUMBEL),
    "stgumbel": _settings(1e-3, 0.01, **_GUMBEL),
    "softmax": _settings(1e-3, 0.1),
    "sparsemax": _settings(5e-3, 0.1),
}
DEFAULT_SETTINGS = _settings(1e-3, 0.1)


def _feature_source(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{attribute.name} must be one of {', '.join(OFFLINE_SOURCES)} or a path to a feature directory "
            f"(train/ and test/ with the h5 + pickle files), got {value!r}"
        )


@attrs.frozen
class SignalGameConfig(TaskConfig):
    """Game and architecture sizes (paper defaults).

    ``features``: ``"mnist-fashion-relu"`` (default), ``"mnist-fashion"`` (L2-normalised pixels) or a directory of
    the paper's feature files (:mod:`lvzoo.tasks.signal_data`); ``loss``: ``"nll"`` or the paper's ``"zero_one"``
    (:class:`~lvzoo.models.signal.GameLoss`).
    """

    features: str = attrs.field(default=MNIST_FASHION_RELU, validator=_feature_source)
    loss: TrainingLoss = attrs.field(default="nll", validator=attrs.validators.in_(TRAINING_LOSSES))
    num_candidates: int = attrs.field(default=16, validator=int_at_least(2))
    vocab_size: int = attrs.field(default=256, validator=int_at_least(2))
    hidden_size: int = attrs.field(default=512, validator=int_at_least(1))
    embedding_size: int = attrs.field(default=256, validator=int_at_least(1))
    sender_temperature: float = attrs.field(
        default=10.0, validator=number_in(0, math.inf, low_open=True, high_open=True)
    )
    games_per_epoch: int = attrs.field(default=100 * 64, validator=int_at_least(1))


@attrs.frozen
class GameBatch:
    """Games on the device: candidate features ``[B, C, F]`` and target positions ``[B]``."""

    candidates: Tensor
    target: Tensor

    def target_features(self) -> Tensor:
        """The sender's input, the target's features ``[B, F]``."""
        rows = torch.arange(self.target.shape[0], device=self.target.device)
        return self.candidates[rows, self.target]


@attrs.frozen
class GameSplits:
    """Train and test images (on the device) and the fixed validation / test games."""

    train_images: ConceptImages
    test_images: ConceptImages
    val_games: Games
    test_games: Games


class SignalGameTask(Task[SignalGameConfig]):
    """The signalling game; see the module docstring. Data is loaded on first use."""

    config_class: ClassVar[type[TaskConfig]] = SignalGameConfig
    default_epochs: ClassVar[int] = 500
    paper_estimators = ("sfe", "nvil", "gumbel", "stgumbel", "softmax", "sparsemax")
    paper_seeds = tuple(range(322, 332))
    selection_metric = ("val_success", "max")

    @classmethod
    def paper_variants(cls, config: SignalGameConfig) -> dict[str, tuple[str, dict[str, Any]]]:
        """The paper's 0/1-loss rows: SFE (0/1) with its entropy coefficient 0.01, and SFE+ (0/1)."""
        return {
            "sfe-01": ("sfe", {"loss": "zero_one", "entropy_coef": 0.01}),
            "sfe+-01": ("sfe+", {"loss": "zero_one"}),
        }

    @classmethod
    def paper_settings(cls, estimator: str, config: SignalGameConfig) -> PaperSettings:
        """:data:`PAPER_SETTINGS` of ``estimator`` (``DEFAULT_SETTINGS`` outside the paper's table)."""
        return PAPER_SETTINGS.get(estimator, DEFAULT_SETTINGS)

    def __init__(self, config: SignalGameConfig, data_dir: Path | None, device: torch.device) -> None:
        super().__init__(config, data_dir, device)
        self._splits: GameSplits | None = None

    def splits(self) -> GameSplits:
        """Train/test images on the device and the fixed val/test games (loaded once)."""
        if self._splits is None:
            config = self.config
            train = load_concept_images(config.features, "train", self.data_dir).to(self.device)
            test = load_concept_images(config.features, "test", self.data_dir).to(self.device)
            if train.feature_dim != test.feature_dim:
                raise ValueError(f"train features have width {train.feature_dim}, test features {test.feature_dim}")
            val_count = min(VAL_GAMES, config.eval_limit or VAL_GAMES)
            test_count = min(TEST_GAMES, config.eval_limit or TEST_GAMES)
            self._splits = GameSplits(
                train_images=train,
                test_images=test,
                val_games=self._fixed_games(train, val_count, VAL_SEED),
                test_games=self._fixed_games(test, test_count, TEST_SEED),
            )
        return self._splits

    def dataset_description(self) -> dict[str, Any]:
        """The game's images (``features``): split sizes, and a digest of every concept id and of the first 1024
        feature rows per split (the features are a fixed function of the pixels; hashing all of them takes seconds)."""
        splits = self.splits()
        images = {"train": splits.train_images, "test": splits.test_images}
        return {
            "name": f"signal-{self.config.features}",
            "digest": tensor_digest(*(t for i in images.values() for t in (i.concepts, i.features[:1024]))),
            "source": str(self.config.features if "/" in self.config.features else self.data_dir or "default roots"),
            "splits": {
                **{name: int(i.concepts.shape[0]) for name, i in images.items()},
                "val_games": len(splits.val_games),
                "test_games": len(splits.test_games),
            },
        }

    def _fixed_games(self, images: ConceptImages, count: int, seed: int) -> Games:
        generator = torch.Generator().manual_seed(seed)
        return draw_games(images.concepts.cpu(), count, self.config.num_candidates, generator).to(self.device)

    def latent_space(self) -> LatentSpace:
        """``Categorical(vocab_size)``: one symbol."""
        return Categorical(self.config.vocab_size)

    def feature_dim(self) -> int:
        """The image feature width (784 for ``mnist-fashion``, 4096 for the paper's VGG and ReLU features)."""
        return self.splits().train_images.feature_dim

    def build_model(self) -> nn.Module:
        """A fresh :class:`SignalGameModel` with the configured sizes."""
        config = self.config
        return SignalGameModel(
            feature_dim=self.feature_dim(),
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            embedding_size=config.embedding_size,
            sender_temperature=config.sender_temperature,
        )

    def _train_games(self) -> int:
        return min(self.config.games_per_epoch, self.config.train_limit or self.config.games_per_epoch)

    def steps_per_epoch(self) -> int:
        """``ceil(games per epoch / batch size)``."""
        return -(-self._train_games() // self.config.batch_size)

    def train_batches(self, generator: torch.Generator) -> Iterator[GameBatch]:
        """One epoch of freshly drawn training games (randomness from ``generator``), as :class:`GameBatch`."""
        images = self.splits().train_images
        games = draw_games(images.concepts, self._train_games(), self.config.num_candidates, generator)
        yield from self._batches(images, games)

    def _batches(self, images: ConceptImages, games: Games) -> Iterator[GameBatch]:
        batch_size = self.config.batch_size
        for start in range(0, len(games), batch_size):
            chunk = games.slice(start, start + batch_size)
            yield GameBatch(candidates=images.lookup(chunk.candidates), target=chunk.target)

    def _game_loss(self, model: SignalGameModel, batch: GameBatch) -> GameLoss:
        candidate_embeddings = model.receiver.embed_candidates(batch.candidates)
        return model.game_loss(candidate_embeddings, batch.target, self.config.loss)

    def objective(self, model: nn.Module, batch: GameBatch) -> BatchObjective:
        """The sender's scores of the targets and the game loss (``mean(surrogate) - entropy_coef * mean(entropy)``
        in the shared objective); metric ``success`` (the greedy game of this batch)."""
        assert isinstance(model, SignalGameModel)
        target_features = batch.target_features()
        scores = model(target_features)
        game_loss = self._game_loss(model, batch)
        success = model.greedy_success(scores.detach(), game_loss).mean()  # reads the logits the estimator reuses
        return BatchObjective(LatentProblem(scores, game_loss, target_features), metrics={"success": success})

    def evaluate(
        self, model: nn.Module, estimator: Estimator[Any], split: Literal["val", "test"], final: bool = False
    ) -> dict[str, float]:
        """Mean loss, greedy success, decoder_calls and entropy (+ expected_success for marginalization).

        Runs model and estimator in eval mode (restored afterwards); ``final`` changes nothing for this task.
        """
        assert isinstance(model, SignalGameModel)
        splits = self.splits()
        images, games = (
            (splits.train_images, splits.val_games) if split == "val" else (splits.test_images, splits.test_games)
        )
        sums: dict[str, Tensor] = {}
        with evaluation_mode(model, estimator):
            for batch in self._batches(images, games):
                for name, values in self._eval_batch(model, estimator, batch).items():
                    sums[name] = sums.get(name, values.new_zeros(())) + values.sum()
        return {name: float(total) / len(games) for name, total in sums.items()}

    def _eval_batch(self, model: SignalGameModel, estimator: Estimator[Any], batch: GameBatch) -> dict[str, Tensor]:
        """Per-game ``[B]`` metrics; ``expected_success`` is exact under a marginalizing estimator's distribution."""
        target_features = batch.target_features()
        scores = model(target_features)
        game_loss = self._game_loss(model, batch)
        result = estimator(scores, game_loss, target_features)
        values = {
            "loss": result.objective,
            "success": model.greedy_success(scores, game_loss),
            "decoder_calls": result.support.float(),
            "entropy": result.entropy,
        }
        posterior = exact_distribution(estimator, scores)
        if posterior is not None:
            errors = model.game_loss(game_loss.candidate_embeddings, batch.target, "greedy_error")
            values["expected_success"] = 1.0 - marginalize(posterior, errors).objective
        return values
