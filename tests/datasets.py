"""Image data for the task tests: the real MNIST / Fashion-MNIST of ``<repo>/../shared/data`` when it is there,
else small generated files in torchvision's ``<root>/<Name>/raw`` layout (gzipped unsigned-byte IDX files)."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from lvzoo.tasks.data import DatasetName

REPO = Path(__file__).resolve().parents[1]
#: The shared data root (the runner's ``../shared/data`` when run from the repository root).
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_root(*names: DatasetName) -> Path | None:
    """``SHARED_DATA`` when it holds the raw files of every dataset in ``names``, else ``None``."""
    return SHARED_DATA if all((SHARED_DATA / name / "raw").is_dir() for name in names) else None


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped unsigned-byte IDX file of ``array`` (values cast to uint8)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), compresslevel=1))


def write_dataset(
    root: Path, name: DatasetName, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> None:
    """Write ``(images [N, 28, 28], labels [N])`` of the train and test splits to ``root/<name>/raw``."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)


def write_random_datasets(root: Path, sizes: Mapping[DatasetName, tuple[int, int]], seed: int = 0) -> None:
    """Uniformly random uint8 images with random labels 0..9, ``sizes[name] = (num_train, num_test)`` images per
    dataset, drawn in order from one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    for name, (num_train, num_test) in sizes.items():
        splits = [
            (rng.integers(0, 256, (count, 28, 28)), rng.integers(0, 10, count)) for count in (num_train, num_test)
        ]
        write_dataset(root, name, splits[0], splits[1])


def shared_or_random_root(
    tmp_path_factory: pytest.TempPathFactory, sizes: Mapping[DatasetName, tuple[int, int]], seed: int = 0
) -> Path:
    """The shared data root when it holds every dataset of ``sizes``, else a new temporary root with
    :func:`write_random_datasets` of ``sizes``."""
    shared = shared_data_root(*sizes)
    if shared is not None:
        return shared
    root = tmp_path_factory.mktemp("data")
    write_random_datasets(root, sizes, seed)
    return root


def write_learnable_dataset(root: Path, name: DatasetName, num_train: int, num_test: int, seed: int = 0) -> None:
    """A learnable stand-in for ``name`` in ``root/<name>/raw``: ten class prototypes (random 7x7 grey patterns
    upsampled to 28x28 blocks), each image its class's prototype plus Gaussian noise (sd 16 grey levels), labels
    uniform in 0..9."""
    rng = np.random.default_rng(seed)
    prototypes = np.kron(rng.choice([0.0, 64.0, 255.0], size=(10, 7, 7), p=[0.5, 0.2, 0.3]), np.ones((1, 4, 4)))

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, count)
        images = np.clip(prototypes[labels] + rng.normal(0.0, 16.0, (count, 28, 28)), 0, 255).round()
        return images, labels

    write_dataset(root, name, split(num_train), split(num_test))
