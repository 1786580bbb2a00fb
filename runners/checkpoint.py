"""Checkpoints: atomic writes and the complete RNG state, so a resumed run continues bit-for-bit.

A checkpoint is a plain dict saved with :func:`torch.save` and loadable with ``weights_only=True`` (only
tensors, numbers, strings, lists, tuples and dicts). Its top level holds the run plan's dict
(:meth:`lvzoo.runners.plan.RunPlan.to_dict`), ``format``, ``run_id``, ``tracking_uri`` and ``run_dir``, the
model, estimator and optimizer state dicts, every RNG state (``rng``), the training position
(:class:`lvzoo.runners.trainer.TrainState`), ``finished`` and, once finished, ``test_metrics``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lvzoo
from lvzoo.runners.plan import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
#: Version of the checkpoint layout. 2: resolved configs (no ``None`` for the paper's values), per-epoch support
#: statistics. 3: score-function estimators keep their baseline state in a ``baseline`` submodule and their configs
#: name the sampler and baseline. Older checkpoints are refused with a one-line error naming their format.
CHECKPOINT_FORMAT = 3


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


def check_format(state: Mapping[str, Any]) -> None:
    """Refuse, in one line, a checkpoint whose ``format`` is not :data:`CHECKPOINT_FORMAT`."""
    found = state.get("format")
    if found != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint format {found!r} is not supported: this lvzoo {lvzoo.__version__} reads format "
            f"{CHECKPOINT_FORMAT} (retrain, or resume with the lvzoo version that wrote it)"
        )


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
