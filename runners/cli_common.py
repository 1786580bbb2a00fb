"""What the ``runner`` commands share: exit codes, ``--set`` parsing, one-line errors and common options."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from lvzoo.runners.errors import ConfigError, one_line
from lvzoo.runners.process import TerminatedError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def parse_assignments(assignments: Iterable[str]) -> dict[str, str]:
    """``["a=1", "task.b=x"]`` -> ``{"a": "1", "task.b": "x"}``; refuses items without ``=``."""
    parsed: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        parsed[key] = value.strip()
    return parsed


class OneLineError(click.ClickException):
    """A user error shown as one ``Error: ...`` line (click's usage errors span several lines)."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class Group(click.Group):
    """Click group whose usage errors (bad options, unknown commands) are one line too."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise OneLineError(exc.format_message()) from None

    def invoke(self, ctx: click.Context) -> Any:
        with lvzoo_warnings_as_lines():
            try:
                return super().invoke(ctx)
            except click.UsageError as exc:
                raise OneLineError(exc.format_message()) from None
            except (click.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except Exception as exc:
                message = expected_failure(exc)
                if message is None or debugging():
                    raise
                raise OneLineError(message) from None


#: Set (to anything but empty or 0) for full tracebacks of expected failures; ``runner --debug`` sets it.
DEBUG_ENV = "LVZOO_DEBUG"


def debugging() -> bool:
    """Whether expected failures show their traceback (``--debug`` / ``$LVZOO_DEBUG``)."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def expected_failure(exc: BaseException) -> str | None:
    """The one-line message of a failure a user can act on (a bad configuration, a file or directory that is missing,
    unreadable or unwritable, a full disk, an unusable tracking store), else ``None`` (a bug: show its traceback)."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.filename and exc.strerror:
            return f"{exc.strerror}: {exc.filename!r}"
        return one_line(str(exc)) or type(exc).__name__
    if type(exc).__module__.split(".")[0] in ("mlflow", "sqlalchemy"):
        return f"the tracking store failed: {type(exc).__name__}: {one_line(str(exc))[:300]} (check --tracking-uri)"
    return None


@contextmanager
def lvzoo_warnings_as_lines() -> Iterator[None]:
    """Inside the block, lvzoo's own warnings print as one ``Warning: ...`` line on stderr; others as usual."""
    original = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if category.__module__.startswith("lvzoo."):
            click.echo(f"Warning: {one_line(str(message))}", err=True)
        else:
            original(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def interrupt_exit(exc: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(exc, TerminatedError) else EXIT_INTERRUPTED


#: Options shared by several commands.
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when available, else cpu), cpu, cuda or cuda:N."
)
tracking_uri_option = click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)."
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LVZOO_DATA",
    default=None,
    help="Dataset directory passed to the task [env: LVZOO_DATA].",
)
