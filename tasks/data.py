"""Offline-first loading of MNIST / Fashion-MNIST as uint8 tensors (torchvision's ``<root>/<Name>/raw`` layout).

Where the data is looked for, in order:

1. the ``data_dir`` argument (the runner's ``--data-dir``),
2. the ``LVZOO_DATA`` environment variable,
3. ``../shared/data`` relative to the working directory,
4. the download cache ``~/.cache/lvzoo/data`` (``LVZOO_CACHE`` overrides it).

If no root holds the files, torchvision downloads them into the cache (not when ``LVZOO_OFFLINE=1``); without network
a :class:`DataNotFoundError` says where to put them. Images stay uint8 ``[N, 28, 28]`` on the device; binarization
happens per batch on the device (no per-item PIL decoding).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

DatasetName = Literal["MNIST", "FashionMNIST"]
Split = Literal["train", "test"]
DATASETS: tuple[DatasetName, ...] = ("MNIST", "FashionMNIST")
_PREFIX: dict[Split, str] = {"train": "train", "test": "t10k"}
_SSVAE_SPLITS = ("labeled_train_indx", "unlabeled_train_indx", "validation_indx")


class DataNotFoundError(FileNotFoundError):
    """The dataset files are in none of the searched roots and could not be downloaded (one-line message)."""


class DataUnreadableError(OSError):
    """A dataset file exists but cannot be parsed (truncated, not IDX, mismatched); the message names it."""


def cache_dir() -> Path:
    """Download cache root (``LVZOO_CACHE`` or ``~/.cache/lvzoo/data``)."""
    return Path(os.environ.get("LVZOO_CACHE", Path.home() / ".cache" / "lvzoo" / "data"))


def candidate_roots(data_dir: Path | None = None) -> list[Path]:
    """The data roots searched, in order (see the module docstring)."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    env = os.environ.get("LVZOO_DATA")
    if env:
        roots.append(Path(env))
    roots.append(Path.cwd().parent / "shared" / "data")
    roots.append(cache_dir())
    return roots


def _raw_file(root: Path, name: DatasetName, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        path = root / name / "raw" / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array of its stated shape; an unreadable file is a
    :class:`DataUnreadableError` naming it."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        magic = int.from_bytes(data[0:4], "big")
        if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
            raise ValueError(f"not an unsigned-byte IDX file (magic {magic:#x})")
        ndim = magic & 0xFF
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError) as exc:
        raise DataUnreadableError(
            f"cannot read {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]} (delete it to download it "
            "again, or replace it with an intact copy)"
        ) from exc


def _download(name: DatasetName) -> None:
    import torchvision

    dataset_cls = torchvision.datasets.MNIST if name == "MNIST" else torchvision.datasets.FashionMNIST
    dataset_cls(str(cache_dir()), train=True, download=True)
    dataset_cls(str(cache_dir()), train=False, download=True)


def find_root(name: DatasetName, data_dir: Path | None = None, download: bool = True) -> Path:
    """The first root holding ``<root>/<name>/raw`` train and test files, downloading into the cache if needed."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    stems = [f"{_PREFIX[s]}-{kind}" for s in ("train", "test") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    roots = candidate_roots(data_dir)
    for root in roots:
        if all(_raw_file(root, name, stem) is not None for stem in stems):
            return root
    offline = os.environ.get("LVZOO_OFFLINE", "").strip() not in ("", "0")
    if download and not offline:
        try:
            _download(name)
        except Exception as exc:  # no network, proxy, disk...: say where the files go
            searched = ", ".join(str(r) for r in roots)
            raise DataNotFoundError(
                f"{name} not found (searched {searched}) and the download failed ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:160]}). "
                f"Put the files {', '.join(s + '.gz' for s in stems)} into <root>/{name}/raw/ and pass "
                f"--data-dir <root> or set LVZOO_DATA=<root>."
            ) from exc
        return cache_dir()
    reason = " (downloads are off: LVZOO_OFFLINE is set)" if download and offline else ""
    raise DataNotFoundError(
        f"{name} not found in any of: {', '.join(str(r) for r in roots)}{reason}. Put the files "
        f"{', '.join(s + '.gz' for s in stems)} into <root>/{name}/raw/ and pass --data-dir <root> or set "
        "LVZOO_DATA=<root>."
    )


def load_images(
    name: DatasetName, split: Split, data_dir: Path | None = None, download: bool = True
) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of one split."""
    if split not in _PREFIX:
        raise ValueError(f"unknown split {split!r}; accepted: train, test")
    root = find_root(name, data_dir, download)
    images_path = _raw_file(root, name, f"{_PREFIX[split]}-images-idx3-ubyte")
    labels_path = _raw_file(root, name, f"{_PREFIX[split]}-labels-idx1-ubyte")
    assert images_path is not None and labels_path is not None  # find_root checked both
    images = torch.from_numpy(_read_idx(images_path).copy())
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise DataUnreadableError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    return images, labels


def load_ssvae_splits(data_dir: Path | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The paper's ``(labelled, unlabelled, validation)`` MNIST-train indices from ``<root>/ssvae-splits``, or None."""
    for root in candidate_roots(data_dir):
        folder = root / "ssvae-splits"
        paths = [folder / f"{stem}.npy" for stem in _SSVAE_SPLITS]
        if all(p.is_file() for p in paths):
            labelled, unlabelled, validation = (torch.from_numpy(np.load(p).astype(np.int64)) for p in paths)
            return labelled, unlabelled, validation
    return None


def binarize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Dynamic binarization on the images' device: uint8 ``[..]`` -> float 0/1 ``[..]``, P(1) = pixel / 255."""
    probs = images.float() / 255.0
    return torch.bernoulli(probs, generator=generator)


def minibatch_indices(
    count: int, batch_size: int, generator: torch.Generator | None, device: torch.device, drop_last: bool = False
) -> Iterator[Tensor]:
    """Index tensors ``[batch_size]`` (on ``device``) of one epoch over ``count`` items; shuffled if ``generator``."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    order = order.to(device)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
