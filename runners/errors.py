"""The runner's user-facing errors (importing this module imports nothing heavy, so the CLI can catch them before
torch is loaded): every expected failure is one line that names the bad value or file and what to do."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid run configuration or an expected failure of a run; the message is a single line for the user."""


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(message.split())
