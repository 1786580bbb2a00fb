"""How long ``runner --help`` takes as a fresh process (the issue's target: well under 0.5 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

RUNNER = Path(sys.executable).with_name("runner")


def test_runner_help(benchmark: Any) -> None:
    def run() -> None:
        subprocess.run([str(RUNNER), "--help"], check=True, capture_output=True)

    benchmark.pedantic(run, rounds=5, iterations=1)
