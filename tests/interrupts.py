"""Interrupting training runs in tests: an action injected before the n-th call of a method (``KeyboardInterrupt``,
a pause), and a training subprocess killed with ``SIGKILL`` once it has reached a given point."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ParamSpec, TypeVar

import pytest

P = ParamSpec("P")
R = TypeVar("R")


def before_call(method: Callable[P, R], call: int, action: Callable[[], None]) -> Callable[P, R]:
    """``method`` wrapped to run ``action()`` before its ``call``-th call (counting from 1), e.g. to raise
    ``KeyboardInterrupt`` at a given training step when set as ``Task.train_step``."""
    calls = 0

    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        nonlocal calls
        calls += 1
        if calls == call:
            action()
        return method(*args, **kwargs)

    return wrapped


def raise_keyboard_interrupt() -> None:
    """An action for :func:`before_call`: what Ctrl-C raises."""
    raise KeyboardInterrupt


def sigkill_once_file_exists(code: str, ready: Path, *, cwd: Path, env: Mapping[str, str], timeout_s: float) -> int:
    """Run ``python -c code`` in a subprocess and ``SIGKILL`` it as soon as the file ``ready`` exists; the test fails
    if the process exits first (with its stderr) or ``ready`` does not appear within ``timeout_s``. Returns the
    process's exit status."""
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"training subprocess exited early: {stderr}")
            assert time.monotonic() < deadline, f"{ready} did not appear within {timeout_s:g} s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
        if process.stderr:
            process.stderr.close()
    return process.returncode
