"""Checkpoints: atomic writes and the complete RNG state, so a resumed run continues bit-for-bit.

A checkpoint is a plain dict saved with :func:`torch.save` and loadable with ``weights_only=True`` (only
tensors, numbers, strings, lists, tuples and dicts). It holds the model, optimizer and estimator state dicts,
progress counters, every RNG state and the resolved configuration.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and :func:`os.replace` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (safe ``weights_only`` unpickling)."""
    state: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
    return state


def capture_rng(shuffle_generator: torch.Generator) -> dict[str, Any]:
    """States of python ``random``, numpy's global RNG, torch (CPU and CUDA) and the shuffling generator."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "shuffle": shuffle_generator.get_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any], shuffle_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng` (the CUDA states are restored when both sides have CUDA)."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(rng["torch"].cpu())
    shuffle_generator.set_state(rng["shuffle"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
