"""Data of the semi-supervised VAE (:mod:`lvzoo.tasks.ssvae`): the paper's MNIST split (or a seeded one of the
same proportions), the splits on the device, and warm-start weights.

Shapes: ``N`` images per split, ``P = 784`` pixels.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import attrs
import torch
from torch import Tensor

from lvzoo.models.ssvae import IMAGE_PIXELS
from lvzoo.tasks.data import find_root, load_images, load_ssvae_splits


@attrs.frozen
class SSVAEData:
    """uint8 images ``[N, P]`` and int64 labels ``[N]`` of each split, on the task's device."""

    labelled_images: Tensor
    labelled_labels: Tensor
    unlabelled_images: Tensor
    val_images: Tensor
    val_labels: Tensor
    test_images: Tensor
    test_labels: Tensor



def load_model_state(path: Path) -> Mapping[str, Tensor]:
    """The model state_dict in ``path``: the ``"model"`` entry of a runner checkpoint, or a bare state_dict."""
    if not path.is_file():
        raise FileNotFoundError(f"init_checkpoint {str(path)!r} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"init_checkpoint {str(path)!r} is not a weights-only torch checkpoint: {exc}") from exc
    state = saved.get("model", saved) if isinstance(saved, Mapping) else saved
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"init_checkpoint {str(path)!r} holds neither a state_dict nor a checkpoint with a 'model' state_dict"
        )
    return state


def split_indices(num_train: int, data_root: Path, split_seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(labelled, unlabelled, validation)`` indices into the training images (see the module docstring)."""
    if (data_root / "ssvae-splits").is_dir():
        splits = load_ssvae_splits(data_root)
        if splits is not None:
            largest = max(int(s.max()) for s in splits)
            if largest >= num_train:
                raise ValueError(
                    f"{data_root / 'ssvae-splits'} indexes image {largest}, but the training set has {num_train}"
                )
            return splits
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(split_seed))
    num_labelled, num_val = num_train // 12, num_train // 6
    return order[:num_labelled], order[num_labelled + num_val :], order[num_labelled : num_labelled + num_val]


def load_ssvae_data(
    data_dir: Path | None, split_seed: int, train_limit: int | None, eval_limit: int | None, device: torch.device
) -> SSVAEData:
    """The splits of :func:`split_indices` (at most ``train_limit`` training and ``eval_limit`` evaluation images,
    the labelled share kept), flattened, on ``device``."""
    root = find_root("MNIST", data_dir)
    train_images, train_labels = load_images("MNIST", "train", root)
    test_images, test_labels = load_images("MNIST", "test", root)
    labelled, unlabelled, validation = split_indices(train_images.shape[0], root, split_seed)
    limit = train_limit
    total = labelled.shape[0] + unlabelled.shape[0]
    if limit is not None and limit < total:
        keep_labelled = max(1, round(limit * labelled.shape[0] / total))
        labelled, unlabelled = labelled[:keep_labelled], unlabelled[: max(1, limit - keep_labelled)]
    eval_limit = eval_limit
    validation = validation[:eval_limit]
    test_images, test_labels = test_images[:eval_limit], test_labels[:eval_limit]
    flat = train_images.reshape(-1, IMAGE_PIXELS)

    def on_device(t: Tensor) -> Tensor:
        return t.to(device)

    return SSVAEData(
        labelled_images=on_device(flat[labelled]),
        labelled_labels=on_device(train_labels[labelled]),
        unlabelled_images=on_device(flat[unlabelled]),
        val_images=on_device(flat[validation]),
        val_labels=on_device(train_labels[validation]),
        test_images=on_device(test_images.reshape(-1, IMAGE_PIXELS)),
        test_labels=on_device(test_labels),
    )
