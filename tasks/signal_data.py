"""Data of the referential signalling game: image features grouped into concepts, and games drawn from them.

Two feature sources are supported (both give a :class:`ConceptImages`):

- ``"mnist-fashion"`` (the offline default): MNIST and Fashion-MNIST as **20 concepts** (digits 0-9 are concepts
  0-9, clothing classes 0-9 are concepts 10-19). An image's features are its 784 pixel intensities, L2-normalised
  per image (the same normalisation the original loader applies to the VGG features; any global scale such as
  /255 cancels). Train images: the 60K + 60K train splits; test images: the 10K + 10K test splits.
- A directory in the format of the paper's original data (github.com/DianeBouchacourt/SignalingGame, read by
  ``egg/zoo/signal_game/features.py`` in EGG and ``experiments/signal-game`` in the paper's code): ``<root>/train``
  and ``<root>/test`` each hold

  * ``ours_images_single_sm0.h5``: an HDF5 file whose **first** (in practice only) dataset is the float feature
    matrix ``[N, F]`` (F = 4096 VGG fc features in the paper);
  * ``ours_images_single_sm0.objects``: a pickle of the ``N`` concept labels (a numpy array or a sequence of
    hashable values, e.g. ImageNet synset names), one per feature row.

  The paths pickle (``ours_images_paths_sm0.objects``) of the original data is not needed and is ignored.
  Concepts are numbered in order of first appearance, features are L2-normalised per row, as in the original
  loader. Pickles can run code when loaded: only load files you trust.

A game (Lazaridou et al. 2017): ``num_candidates`` distinct concepts are drawn uniformly, one image uniformly from
each; the candidate list is in random order and one uniformly random position holds the target (so the target's
concept is uniform and the distractors come from ``num_candidates - 1`` distinct other concepts).
"""

from __future__ import annotations

import functools
import math
import pickle
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lvzoo.tasks.data import load_images

Split = Literal["train", "test"]
MNIST_FASHION = "mnist-fashion"
MNIST_FASHION_RELU = "mnist-fashion-relu"
OFFLINE_SOURCES = (MNIST_FASHION_RELU, MNIST_FASHION)
#: Width and seed of the fixed random ReLU feature map of the offline default (:func:`random_relu_features`).
RELU_FEATURE_WIDTH = 4096
RELU_FEATURE_SEED = 20200724
FEATURES_FILE = "ours_images_single_sm0.h5"
LABELS_FILE = "ours_images_single_sm0.objects"
_MNIST_CLASSES = 10


@attrs.frozen
class ConceptImages:
    """Images of one split: ``features [N, F]`` (uint8 pixels or float) and ``concepts [N]`` long ids."""

    features: Tensor
    concepts: Tensor

    @property
    def feature_dim(self) -> int:
        """``F``, the width of one feature row."""
        return int(self.features.shape[1])

    def concept_count(self) -> int:
        """Number of distinct concepts that have at least one image."""
        return int(torch.unique(self.concepts).numel())

    def to(self, device: torch.device) -> ConceptImages:
        """The same images on ``device``."""
        return ConceptImages(features=self.features.to(device), concepts=self.concepts.to(device))

    def lookup(self, index: Tensor) -> Tensor:
        """L2-normalised float32 features ``[..., F]`` of the images ``index [...]`` (on the features' device)."""
        return F.normalize(self.features[index].to(torch.float32), dim=-1)


@attrs.frozen
class Games:
    """``games`` referential games: ``candidates [G, C]`` image indices and ``target [G]`` positions in ``[0, C)``."""

    candidates: Tensor
    target: Tensor

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def to(self, device: torch.device) -> Games:
        """The same games on ``device``."""
        return Games(candidates=self.candidates.to(device), target=self.target.to(device))

    def slice(self, start: int, stop: int) -> Games:
        """Games ``start..stop-1``."""
        return Games(candidates=self.candidates[start:stop], target=self.target[start:stop])


def draw_games(concepts: Tensor, num_games: int, num_candidates: int, generator: torch.Generator) -> Games:
    """Draw ``num_games`` games over images with concept ids ``concepts [N]`` (see the module docstring).

    All randomness comes from ``generator`` (on any device); the games are on ``concepts``' device. Raises
    ``ValueError`` if fewer than ``num_candidates`` concepts have images.
    """
    device = concepts.device
    present, counts = torch.unique(concepts, return_counts=True)  # [P] each, sorted
    if present.numel() < num_candidates:
        raise ValueError(
            f"num_candidates={num_candidates} needs images of at least {num_candidates} distinct concepts; "
            f"these images have {present.numel()}"
        )
    image_order = torch.argsort(concepts, stable=True)  # images grouped by concept, concepts ascending
    first_image = torch.cumsum(counts, 0) - counts  # [P] offset of each concept's group in image_order

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    chosen = torch.argsort(uniform(num_games, present.numel()), dim=1)[:, :num_candidates]  # [G, C] distinct
    within = (uniform(num_games, num_candidates) * counts[chosen]).long()
    within = torch.minimum(within, counts[chosen] - 1)  # guards the measure-zero u * n == n rounding case
    candidates = image_order[first_image[chosen] + within]
    target = (uniform(num_games) * num_candidates).long().clamp_max(num_candidates - 1)
    return Games(candidates=candidates, target=target)


def load_mnist_fashion(split: Split, data_dir: Path | None = None) -> ConceptImages:
    """MNIST + Fashion-MNIST ``split`` as 20 concepts: uint8 pixels ``[N, 784]`` and concepts ``[N]``."""
    digits, digit_labels = load_images("MNIST", split, data_dir)
    clothes, clothing_labels = load_images("FashionMNIST", split, data_dir)
    features = torch.cat([digits.flatten(1), clothes.flatten(1)])
    concepts = torch.cat([digit_labels, clothing_labels + _MNIST_CLASSES])
    return ConceptImages(features=features, concepts=concepts)


def random_relu_features(pixels: Tensor, pixel_mean: Tensor, width: int = RELU_FEATURE_WIDTH) -> Tensor:
    """Float16 features ``relu((pixels / 255 - pixel_mean) @ P)`` ``[N, width]`` of uint8 ``pixels [N, 784]``.

    ``P [784, width]`` is a fixed Gaussian matrix drawn from ``RELU_FEATURE_SEED`` (the same on every machine and
    run); ``pixel_mean [784]`` is the mean train image in ``[0, 1]``. Rows are L2-normalised on lookup.
    """
    generator = torch.Generator().manual_seed(RELU_FEATURE_SEED)
    projection = torch.randn(pixels.shape[1], width, generator=generator) / math.sqrt(pixels.shape[1])
    projection = projection.to(pixels.device)
    chunks = [
        torch.relu((chunk.to(torch.float32) / 255.0 - pixel_mean) @ projection).to(torch.float16)
        for chunk in torch.split(pixels, 8192)
    ]
    return torch.cat(chunks)


@functools.lru_cache(maxsize=2)
def load_mnist_fashion_relu(split: Split, data_dir: Path | None = None) -> ConceptImages:
    """MNIST + Fashion-MNIST ``split`` as 20 concepts with :func:`random_relu_features` (the offline default).

    Memoised per (split, data_dir) within a process: the map costs about 10 s of CPU for the 120K train images.
    """
    train = load_mnist_fashion("train", data_dir)
    images = train if split == "train" else load_mnist_fashion(split, data_dir)
    pixel_mean = train.features.to(torch.float32).mean(0) / 255.0
    return ConceptImages(features=random_relu_features(images.features, pixel_mean), concepts=images.concepts)


def load_vgg_features(split_dir: Path) -> ConceptImages:
    """The paper's feature files in ``split_dir`` (see the module docstring): float32 ``[N, F]`` and concepts."""
    import h5py

    features_path, labels_path = split_dir / FEATURES_FILE, split_dir / LABELS_FILE
    for path in (features_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a signal-game feature directory needs {FEATURES_FILE} and {LABELS_FILE} "
                "in each of its train/ and test/ folders"
            )
    with h5py.File(features_path, "r") as handle:
        keys = list(handle.keys())
        if not keys:
            raise ValueError(f"{features_path} holds no dataset")
        matrix = np.asarray(handle[keys[0]][()], dtype=np.float32)
    with labels_path.open("rb") as stream:
        labels = pickle.load(stream)
    label_list = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    if matrix.ndim != 2 or matrix.shape[0] != len(label_list):
        raise ValueError(
            f"{features_path} must hold a [N, F] matrix with one row per label of {labels_path} "
            f"({len(label_list)} labels), got shape {matrix.shape}"
        )
    concept_of: dict[object, int] = {}
    concepts = [concept_of.setdefault(label, len(concept_of)) for label in label_list]
    return ConceptImages(features=torch.from_numpy(matrix), concepts=torch.tensor(concepts, dtype=torch.long))


def load_concept_images(source: str, split: Split, data_dir: Path | None = None) -> ConceptImages:
    """The images of ``split`` from ``source``: ``"mnist-fashion"`` or a feature directory (module docstring)."""
    if source == MNIST_FASHION:
        return load_mnist_fashion(split, data_dir)
    if source == MNIST_FASHION_RELU:
        return load_mnist_fashion_relu(split, data_dir)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"features={source!r} is neither {MNIST_FASHION!r} nor a directory with train/ and test/ folders "
            f"holding {FEATURES_FILE} and {LABELS_FILE}"
        )
    return load_vgg_features(root / split)
