"""Checkpoints: atomic writes, the last two good ones kept with checksums, and the complete RNG state, so a resumed
run continues bit-for-bit.

:func:`save_checkpoint` keeps the previous checkpoint as ``checkpoint.prev.pt`` and records the SHA-256 of both in
``checkpoints.json`` next to them; :func:`load_checkpoint` verifies a file against it and falls back to the previous
one (with a warning) when the newest is missing, truncated or altered. Every write goes through a temporary file,
``fsync`` and :func:`os.replace`, so a ``kill -9`` at any moment leaves at least one good checkpoint.

A checkpoint is a plain dict saved with :func:`torch.save` and loadable with ``weights_only=True`` (only
tensors, numbers, strings, lists, tuples and dicts). Its top level holds the run plan's dict
(:meth:`lvzoo.runners.plan.RunPlan.to_dict`), ``format``, ``run_id``, ``tracking_uri`` and ``run_dir``, the
model, estimator and optimizer state dicts, every RNG state (``rng``), the training position
(:class:`lvzoo.runners.trainer.TrainState`), ``finished`` and, once finished, ``test_metrics``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import warnings
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lvzoo
from lvzoo.runners.plan import ConfigError, one_line


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped for its previous one (the message says why); the CLI prints it as one line."""


CHECKPOINT_NAME = "checkpoint.pt"
MANIFEST_NAME = "checkpoints.json"
#: Version of the checkpoint layout. 2: resolved configs (no ``None`` for the paper's values), per-epoch support
#: statistics. 3: score-function estimators keep their baseline state in a ``baseline`` submodule and their configs
#: name the sampler and baseline. Older checkpoints are refused with a one-line error naming their format.
CHECKPOINT_FORMAT = 3


def _write_temporary(data: bytes, path: Path) -> Path:
    """Write ``data`` next to ``path`` in a temporary file, flushed to disk; returns it. An ``OSError`` (e.g. a full
    disk) becomes a one-line :class:`ConfigError` and nothing else is touched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        with suppress(OSError):
            tmp.unlink()
        raise ConfigError(
            f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}; the previous checkpoint is kept (free "
            "space or fix permissions, then resume the run)"
        ) from None
    return tmp


def _write_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and :func:`os.replace` (never half-written)."""
    os.replace(_write_temporary(data, path), path)


def _serialize(state: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def save_atomic(state: Mapping[str, Any], path: Path) -> None:
    """Write one checkpoint file atomically (no rotation, no manifest; :func:`save_checkpoint` does both)."""
    _write_atomic(_serialize(state), path)


def previous_path(path: Path) -> Path:
    """Where the previous good checkpoint of ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    try:
        files = json.loads((directory / MANIFEST_NAME).read_text())["files"]
        return {str(name): dict(entry) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded_or_unknown(path: Path, manifest: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether ``path`` matches its manifest checksum, or the manifest has no record of it to compare with."""
    if path.name not in manifest:
        return True
    return _sha256(path) == manifest[path.name].get("sha256")


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Save ``state`` as ``path``, keeping the one it replaces as :func:`previous_path`, and record both checksums
    (and their ``completed_epochs``) in ``checkpoints.json``."""
    data = _serialize(state)
    manifest = _read_manifest(path.parent)
    previous = previous_path(path)
    files: dict[str, dict[str, Any]] = {}
    tmp = _write_temporary(data, path)  # a failed write leaves both checkpoints as they are
    if path.is_file() and _recorded_or_unknown(path, manifest):
        os.replace(path, previous)  # the file being replaced becomes the previous good one
        if path.name in manifest:
            files[previous.name] = manifest[path.name]
    elif previous.name in manifest:  # a damaged newest file is dropped, the previous good one stays
        files[previous.name] = manifest[previous.name]
    os.replace(tmp, path)
    files[path.name] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "completed_epochs": int(state.get("completed_epochs", 0)),
        "finished": bool(state.get("finished", False)),
    }
    _write_atomic((json.dumps({"files": files}, indent=2) + "\n").encode(), path.parent / MANIFEST_NAME)


def _load_bytes(data: bytes, path: Path, map_location: torch.device | str) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or foreign files fail deep inside the unpickler
        reason = f"{type(exc).__name__}: {one_line(str(exc))[:120]}"
        raise ConfigError(f"checkpoint {str(path)!r} is truncated or not a checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {str(path)!r} is not an lvzoo checkpoint (it holds a {type(state).__name__})")
    return state


def load(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load one checkpoint file (safe ``weights_only`` unpickling); an unreadable file is a one-line
    :class:`ConfigError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}") from None
    return _load_bytes(data, Path(path), map_location)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> tuple[dict[str, Any], Path]:
    """The newest good checkpoint among ``path`` and its previous one: ``(state, file used)``; falling back emits a
    :class:`CheckpointWarning`.

    A file is good when it loads and, where ``checkpoints.json`` records it, its SHA-256 matches. A newest file
    the manifest does not know yet (killed between its rename and the manifest's write) is accepted when it loads.
    When neither is good, a one-line :class:`ConfigError` gives each file's reason.
    """
    manifest = _read_manifest(path.parent)
    known = {entry.get("sha256") for entry in manifest.values()}
    previous = previous_path(path)
    problems: list[str] = []
    for candidate in (path, previous):
        try:
            data = candidate.read_bytes()
        except OSError as exc:
            problems.append(f"{candidate.name}: {exc.strerror or exc}")
            continue
        unrecorded = candidate.name in manifest and hashlib.sha256(data).hexdigest() not in known
        # killed between renaming the newest file and writing the manifest: the manifest's newest is the previous
        # (checked only then, so a good newest file costs no read of the previous one)
        if unrecorded and not (
            candidate == path and previous.is_file() and manifest[path.name].get("sha256") == _sha256(previous)
        ):
            problems.append(f"{candidate.name}: checksum does not match {MANIFEST_NAME} (truncated or altered)")
            continue
        try:
            state = _load_bytes(data, candidate, map_location)
        except ConfigError as exc:
            problems.append(f"{candidate.name}: {exc}")
            continue
        if problems:
            warnings.warn(f"using the previous checkpoint {str(candidate)!r} ({'; '.join(problems)})",
                          CheckpointWarning, stacklevel=2)
        return state, candidate
    raise ConfigError(f"no good checkpoint in {str(path.parent)!r}: {'; '.join(problems)}")


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
