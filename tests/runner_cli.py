"""Calling the ``runner`` CLI in process and reading what it prints (shared by the runner and end-to-end tests)."""

from __future__ import annotations

import re

from click.testing import CliRunner, Result

from lvzoo.runners.cli import main


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    """``runner ARGS`` in this process (stdout and stderr captured separately)."""
    return CliRunner().invoke(main, args, env=env)


def printed_run_id(stdout: str) -> str:
    """The run id that a successful training call prints."""
    found = re.search(r"^run (\w+) finished", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


def error_line(result: Result) -> str:
    """The single stderr line of a failed CLI call (asserting there is exactly one, and no traceback)."""
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert "Traceback" not in result.output
    return lines[0]
