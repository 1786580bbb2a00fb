"""Checkpoints survive damage: the last two good ones are kept with checksums, loading falls back to the previous
one with a warning, a ``kill -9`` at any moment of a write leaves a loadable checkpoint, and no byte sequence makes
the loader raise anything but a one-line :class:`ConfigError`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.plan import ConfigError
from tests.runner_cli import error_line, invoke, printed_run_id

REPO = Path(__file__).resolve().parents[1]


def state_of(epoch: int, size: int = 1000) -> dict[str, object]:
    return {"completed_epochs": epoch, "finished": False, "weights": torch.full((size,), float(epoch))}


def test_two_good_checkpoints_are_kept_with_their_checksums(tmp_path: Path) -> None:
    path = tmp_path / ckpt.CHECKPOINT_NAME
    for epoch in (1, 2, 3):
        ckpt.save_checkpoint(state_of(epoch), path)
    manifest = json.loads((tmp_path / ckpt.MANIFEST_NAME).read_text())["files"]
    assert {name: entry["completed_epochs"] for name, entry in manifest.items()} == {
        "checkpoint.pt": 3,
        "checkpoint.prev.pt": 2,
    }
    state, used = ckpt.load_checkpoint(path)
    assert used == path and state["completed_epochs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "checkpoints.json"]


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage: str) -> None:
    path = tmp_path / ckpt.CHECKPOINT_NAME
    ckpt.save_checkpoint(state_of(1), path)
    ckpt.save_checkpoint(state_of(2), path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_a_byte":  # still a loadable zip: only the checksum can tell
        position = data.rindex(bytes(torch.full((1,), 2.0).numpy().tobytes()))
        path.write_bytes(data[:position] + b"\x00\x00\x00\x41" + data[position + 4 :])
    else:
        path.unlink()
    with pytest.warns(ckpt.CheckpointWarning, match="using the previous checkpoint .*checkpoint.prev.pt"):
        state, used = ckpt.load_checkpoint(path)
    assert used.name == "checkpoint.prev.pt" and state["completed_epochs"] == 1

    # the next save drops the damaged file instead of keeping it as the previous one
    ckpt.save_checkpoint(state_of(3), path)
    assert ckpt.load(ckpt.previous_path(path))["completed_epochs"] == 1
    assert ckpt.load_checkpoint(path)[0]["completed_epochs"] == 3


def test_no_good_checkpoint_is_one_line_naming_each_file(tmp_path: Path) -> None:
    path = tmp_path / ckpt.CHECKPOINT_NAME
    ckpt.save_checkpoint(state_of(1), path)
    ckpt.save_checkpoint(state_of(2), path)
    for file in (path, ckpt.previous_path(path)):
        file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ConfigError) as caught:
        ckpt.load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "no good checkpoint in" in message
    assert "checkpoint.pt: checksum does not match" in message and "checkpoint.prev.pt: checksum" in message


def test_an_unwritable_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / ckpt.CHECKPOINT_NAME
    ckpt.save_checkpoint(state_of(1), path)
    blocker = tmp_path / f".{path.name}.{os.getpid()}.tmp"
    blocker.mkdir()  # the temporary file cannot be created: the write fails like a full disk would
    with pytest.raises(ConfigError, match=r"cannot write checkpoint .*checkpoint.pt.*previous checkpoint is kept"):
        ckpt.save_checkpoint(state_of(2), path)
    blocker.rmdir()
    state, used = ckpt.load_checkpoint(path)
    assert used == path and state["completed_epochs"] == 1 and not ckpt.previous_path(path).exists()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2000) | st.integers(min_value=0, max_value=3000))
def test_the_loader_never_raises_anything_but_a_one_line_error(tmp_path_factory: pytest.TempPathFactory,
                                                                data: bytes | int) -> None:
    path = tmp_path_factory.mktemp("fuzz") / ckpt.CHECKPOINT_NAME
    if isinstance(data, int):  # a truncation of a real checkpoint
        ckpt.save_atomic(state_of(1, size=100), path)
        full = path.read_bytes()
        data = full[: data % len(full)]
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        ckpt.load(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


WRITER = """
import sys, torch
from pathlib import Path
from lvzoo.runners import checkpoint as ckpt
path = Path(sys.argv[1])
epoch = 0
while True:
    epoch += 1
    ckpt.save_checkpoint({"completed_epochs": epoch, "finished": False, "weights": torch.randn(300_000)}, path)
    print(epoch, flush=True)
"""


def test_kill_9_at_random_moments_of_writing_always_leaves_a_good_checkpoint(tmp_path: Path) -> None:
    """A writer saves 1.2 MB checkpoints in a loop; it is killed at random moments (bounded: 6 kills) and every time
    the newest good checkpoint loads, at most one write behind the last one the writer reported finished."""
    rng = random.Random(0)
    path = tmp_path / ckpt.CHECKPOINT_NAME
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
        assert writer.stdout is not None
        finished = int(writer.stdout.readline())  # at least one write finished: the first is never at risk
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        reported = [finished, *(int(line) for line in writer.stdout.read().split())]
        writer.stdout.close()
        writer.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)  # killed mid-rotation: the previous one is used
            state, _ = ckpt.load_checkpoint(path)
        # the last reported write, or the one after it when the kill came between its rename and its report
        assert state["completed_epochs"] in (max(reported), max(reported) + 1), (reported, state["completed_epochs"])


@pytest.mark.usefixtures("toy_plugins")
def test_resume_and_eval_fall_back_past_a_truncated_checkpoint(mlflow_store: object, workdir: Path) -> None:
    uri = mlflow_store.uri  # type: ignore[attr-defined]
    result = invoke(["--task", "toy", "--estimator", "tempered", "--epochs", "2", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    run_dir = workdir / "runs" / printed_run_id(result.stdout)
    checkpoint = run_dir / ckpt.CHECKPOINT_NAME
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])

    evaluated = invoke(["eval", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "Warning: using the previous checkpoint" in evaluated.stderr
    resumed = invoke(["--resume", str(run_dir), "--epochs", "3", "--tracking-uri", uri])
    assert resumed.exit_code == 0, resumed.output
    assert ckpt.load_checkpoint(checkpoint)[0]["completed_epochs"] == 3

    for file in (checkpoint, ckpt.previous_path(checkpoint)):
        file.write_bytes(b"not a checkpoint")
    line = error_line(invoke(["eval", str(run_dir)]))
    assert line.startswith("Error: no good checkpoint in") and "checkpoint.prev.pt" in line


EPOCHS = 12
RESUME_LOOP = """
import sys
from lvzoo.runners import train
from tests.runner_toy import TemperedSoftmax, ToyTask
uri, run_dir, first = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
ToyTask.step_delay = 0.03
if first:
    train(ToyTask, TemperedSoftmax, epochs=12, seed=3, tracking_uri=uri, run_dir=run_dir, progress=False)
else:
    train(resume=run_dir, tracking_uri=uri, progress=False)
"""


def test_kill_9_at_random_moments_of_training_always_resumes(mlflow_store: object, workdir: Path) -> None:
    """A run is killed at random moments (4 times, bounded) and resumed each time; it always continues, and the
    result equals an uninterrupted run."""
    from lvzoo.runners import train
    from tests.runner_toy import TemperedSoftmax, ToyTask

    uri = mlflow_store.uri  # type: ignore[attr-defined]
    run_dir = workdir / "killed"
    checkpoint = run_dir / ckpt.CHECKPOINT_NAME
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CI": "true"}
    rng = random.Random(1)
    for attempt in range(4):
        before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        process = subprocess.Popen(
            [sys.executable, "-c", RESUME_LOOP, uri, str(run_dir), "1" if attempt == 0 else "0"],
            cwd=workdir, env=env, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        # once this process has written a checkpoint of its own, kill it at a random moment after that
        while process.poll() is None and (not checkpoint.exists() or checkpoint.stat().st_mtime_ns == before):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        process.kill()
        _, error = process.communicate(timeout=60)
        assert process.returncode in (-9, 0) and "Traceback" not in error, error
        if process.returncode == 0:  # the run ended before the kill landed (a loaded machine): nothing left to kill
            break
    state = ckpt.load_checkpoint(checkpoint)[0]
    if not state["finished"]:  # (a kill can also land after the last epoch, while the run ends)
        train(resume=run_dir, tracking_uri=uri, progress=False)
        state = ckpt.load_checkpoint(checkpoint)[0]
    assert state["completed_epochs"] == EPOCHS
    reference = train(ToyTask, TemperedSoftmax, epochs=EPOCHS, seed=3, tracking_uri=uri, progress=False)
    for name, value in reference.model.state_dict().items():
        assert torch.equal(state["model"][name], value), name
