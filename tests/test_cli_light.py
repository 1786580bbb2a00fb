"""The CLI answers ``--help`` without importing anything heavy (torch, MLflow, Ray, numpy): those load only when a
command runs. The time it takes is measured in ``benchmarks/test_bench_cli.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "ray", "numpy", "attrs", "tqdm")
PROBE = """
import json, sys
from lvzoo.runners.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "command", [[], ["list"], ["eval"], ["reproduce"], ["sweep"]], ids=lambda c: c[0] if c else "main"
)
def test_help_imports_nothing_heavy(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *command, "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    loaded = set(json.loads(done.stderr.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
