"""The process around a run: SIGTERM as an exception, the git commit, progress-bar and data-dir defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType


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


def show_progress() -> bool:
    """Progress bars by default: on a terminal, outside CI."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() != "true"


def env_data_dir() -> Path | None:
    """``$LVZOO_DATA`` (``None`` when unset or empty)."""
    value = os.environ.get("LVZOO_DATA")
    return Path(value) if value else None
