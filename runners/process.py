"""The process around a run: SIGTERM as an exception, the git commit, the progress, data-dir and tracking-store
defaults, and retries while another process holds an sqlite store's lock."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Literal


class TerminatedError(KeyboardInterrupt):
    """Raised by the SIGTERM handler installed during training (the run is marked KILLED)."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`TerminatedError`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise TerminatedError(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def git_commit(cwd: Path) -> str | None:
    """``HEAD`` of the git repository containing ``cwd``, or ``None`` (never raises)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


ProgressStyle = Literal["bars", "lines", "none"]
PROGRESS_STYLES: tuple[ProgressStyle, ...] = ("bars", "lines", "none")


def progress_style() -> ProgressStyle:
    """How a run shows progress by default: ``$LVZOO_PROGRESS`` when set to one of :data:`PROGRESS_STYLES`, else
    nothing under CI (``CI=true``), tqdm bars on a terminal, and one line per epoch otherwise (a log file, a job)."""
    chosen = os.environ.get("LVZOO_PROGRESS", "").strip().lower()
    if chosen in PROGRESS_STYLES:
        return chosen
    if os.environ.get("CI", "").lower() == "true":
        return "none"
    return "bars" if sys.stderr.isatty() else "lines"


def env_data_dir() -> Path | None:
    """``$LVZOO_DATA`` (``None`` when unset or empty)."""
    value = os.environ.get("LVZOO_DATA")
    return Path(value) if value else None


def default_tracking_uri(cwd: Path | None = None) -> str:
    """``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """``file://`` URI of the ``mlruns`` folder next to an ``sqlite:///`` database, else ``None``."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    return (database.resolve().parent / "mlruns").as_uri()


@contextmanager
def store_creation_lock(tracking_uri: str) -> Iterator[None]:
    """While active, no other process holding it opens the same ``sqlite:///`` store: an exclusive ``flock`` on
    ``<database>.lock`` (POSIX; elsewhere, and for other stores, nothing). MLflow creates and migrates a new
    database's tables when it first opens it, and two processes doing so at once fail with "table ... already
    exists"."""
    prefix = "sqlite:///"
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]
    if fcntl is None or not tracking_uri.startswith(prefix):
        yield
        return
    database = Path(tracking_uri[len(prefix) :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: Failures of a tracking call that another process causes and a retry resolves: sqlite's write lock, and two runs
#: inserting the same dataset or experiment tag at once (MLflow checks, then inserts; on the retry the row exists and
#: is reused or updated).
TRANSIENT = ("database is locked", "UNIQUE constraint failed: datasets.", "UNIQUE constraint failed: experiment_tags.")
#: How long a tracking call keeps retrying while another process holds the sqlite store's write lock.
LOCK_RETRY_S = 60.0


def retry_locked(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, retried for up to :data:`LOCK_RETRY_S` while it fails for a :data:`TRANSIENT`
    reason (a failed write commits nothing, so a retry never logs twice)."""
    deadline, delay = time.monotonic() + LOCK_RETRY_S, 0.02
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not any(reason in str(exc) for reason in TRANSIENT) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (1.0 + random.random()))
        delay = min(2.0 * delay, 1.0)


class RetryingClient:
    """Calls through to an MLflow client with :func:`retry_locked` (several runs writing one store, as
    ``reproduce`` and sweeps do)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method
        return lambda *args, **kwargs: retry_locked(method, *args, **kwargs)
