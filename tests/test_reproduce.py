"""``runner reproduce``: parallel paper-set runs in spawned workers, MLflow tags and the markdown report.

One reproduction of a toy task (three rows x two seeds x one epoch, two workers) runs once per module: two rows
train the toy task's ``tempered`` estimator (one as a paper variant with more input noise), the third row's
estimator raises in ``forward``. The toy plugins are registered by patching entry points in this process only,
so the spawned workers must get them from the reproduction itself.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from click.testing import CliRunner, Result
from mlflow.tracking import MlflowClient
from torch import Tensor

import lvzoo.registry
import lvzoo.runners.plan
from lvzoo.estimators.base import EstimatorResult, LossFn
from lvzoo.runners import ConfigError
from lvzoo.runners.cli import main
from lvzoo.runners.reproduce_plan import parse_seeds, plan_reproduction
from lvzoo.runners.reproduce_report import LABEL_TAG, REPRODUCE_TAG, SEED_TAG, format_cell
from tests.conftest import TOY_ENTRY_POINTS, MlflowStore
from tests.runner_toy import TemperedSoftmax, ToyTask

SEEDS = (5, 6)
NOISY = 0.5


class ReproToyTask(ToyTask):
    """The toy task with a paper estimator set (one of which crashes) and a noisier paper variant."""

    paper_estimators: ClassVar[tuple[str, ...]] = ("tempered", "crashing")

    @classmethod
    def paper_variants(cls, config: Any) -> dict[str, tuple[str, dict[str, Any]]]:
        return {"tempered-noisy": ("tempered", {"noise": NOISY})}


class CrashingSoftmax(TemperedSoftmax):
    """An estimator whose every forward raises."""

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        raise RuntimeError("deliberate failure in forward")


#: The runner tests' toy plugins (``toy``, ``tempered``) plus this module's task and crashing estimator.
PLUGINS = {
    "lvzoo.tasks": [TOY_ENTRY_POINTS["lvzoo.tasks"], ("reprotoy", "tests.test_reproduce:ReproToyTask")],
    "lvzoo.estimators": [TOY_ENTRY_POINTS["lvzoo.estimators"], ("crashing", "tests.test_reproduce:CrashingSoftmax")],
}
LABELS = ["tempered", "crashing", "tempered-noisy"]


def _patch_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register :data:`PLUGINS` in this process only (like the ``toy_plugins`` fixture)."""

    def with_toys(group: str) -> list[EntryPoint]:
        found = list(entry_points(group=group))
        found += [EntryPoint(name=name, value=value, group=group) for name, value in PLUGINS.get(group, [])]
        return found

    monkeypatch.setattr(lvzoo.registry, "entry_points", with_toys)


@pytest.fixture
def repro_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_plugins(monkeypatch)


@attrs.frozen
class Reproduced:
    result: Result
    report: str
    out_dir: Path
    reproduce_id: str
    store: MlflowStore


@pytest.fixture(scope="module")
def reproduced(mlflow_store: MlflowStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reproduced]:
    """``runner reproduce --task reprotoy --epochs 1 --seeds 5,6 --jobs 2`` from a fresh directory."""
    out_dir = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _patch_plugins(monkeypatch)
        monkeypatch.chdir(out_dir)
        monkeypatch.setenv("CI", "true")
        monkeypatch.delenv("LVZOO_DATA", raising=False)
        args = ["reproduce", "--task", "reprotoy", "--epochs", "1", "--seeds", ",".join(map(str, SEEDS))]
        args += ["--address", "pool", "--jobs", "2", "--set", "hidden=(6,)", "--tracking-uri", mlflow_store.uri]
        args += ["--out", str(out_dir / "report.md")]
        result = CliRunner().invoke(main, args)
        found = re.search(r"Reproduce id `([^`]+)`", result.stdout)
        assert found, result.output
        report = (out_dir / "report.md").read_text()
        yield Reproduced(result, report, out_dir, found.group(1), mlflow_store)


def _table(report: str) -> list[list[str]]:
    """Header and body rows of the markdown table (cells stripped; the separator line dropped)."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def _runs(reproduced: Reproduced) -> list[Any]:
    client = MlflowClient(reproduced.store.uri)
    experiment = client.get_experiment_by_name("reprotoy")
    assert experiment is not None
    return list(
        client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{REPRODUCE_TAG}` = '{reproduced.reproduce_id}'"
        )
    )


def _parse_cell(cell: str) -> tuple[float, float]:
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


def test_report_has_one_row_per_paper_estimator_and_variant(reproduced: Reproduced) -> None:
    header, *rows = _table(reproduced.report)
    assert header[:2] == ["estimator", "runs"] and header[-2:] == ["decoder calls / example (test)", "status"]
    assert set(header[2:-2]) == {"loss", "final_support"}
    assert [row[0] for row in rows] == LABELS
    assert reproduced.report in reproduced.result.stdout
    assert [row[1] for row in rows] == ["2/2", "0/2", "2/2"]
    assert [row[-1] for row in rows][::2] == ["ok", "ok"]


def test_budget_line_states_the_budget(reproduced: Reproduced) -> None:
    budget = next(line for line in reproduced.report.splitlines() if line.startswith("**Budget:**"))
    workers = 2
    threads = max(1, (os.cpu_count() or 1) // workers)
    expected = [
        "task `reprotoy`",
        "1 epoch (paper: 2)",
        "seeds 5, 6 (2 per row)",
        "overrides: hidden=(6,)",
        "device cpu",
        f"{workers} workers x {threads} torch thread",
        "lvzoo ",
        "wall time ",
    ]
    for part in expected:
        assert part in budget


def test_cells_are_mean_and_sample_std_of_the_mlflow_test_metrics(reproduced: Reproduced) -> None:
    header, *rows = _table(reproduced.report)
    runs = _runs(reproduced)
    for row in rows:
        if row[0] == "crashing":
            continue
        label_runs = [run for run in runs if run.data.tags[LABEL_TAG] == row[0]]
        assert sorted(int(run.data.tags[SEED_TAG]) for run in label_runs) == list(SEEDS)
        for column, cell in zip(header[2:-2], row[2:-2], strict=True):
            values = [run.data.metrics[f"test_{column}"] for run in label_runs]
            mean, std = _parse_cell(cell)
            # Cells print 4 (mean) and 2 (std) significant digits: rounding errors below 5e-4 and 5e-2 relative.
            assert math.isclose(mean, statistics.fmean(values), rel_tol=5.1e-4), (row[0], column)
            assert math.isclose(std, statistics.stdev(values), rel_tol=5.1e-2), (row[0], column)
        assert row[-2] == "n/a"  # the toy task logs no test decoder-call metric


def test_runs_share_the_reproduce_tag_and_carry_their_row_settings(reproduced: Reproduced) -> None:
    runs = _runs(reproduced)
    assert len(runs) == len(LABELS) * len(SEEDS)
    assert {run.data.tags[REPRODUCE_TAG] for run in runs} == {reproduced.reproduce_id}
    assert {(run.data.tags[LABEL_TAG], run.data.tags[SEED_TAG]) for run in runs} == {
        (label, str(seed)) for label in LABELS for seed in SEEDS
    }
    for run in runs:
        label = run.data.tags[LABEL_TAG]
        assert run.info.run_name == f"{label}-{run.data.tags[SEED_TAG]}"
        assert run.data.tags["estimator"] == ("crashing" if label == "crashing" else "tempered")
        assert run.data.params["task.hidden"] == "(6,)"
        assert float(run.data.params["task.noise"]) == (NOISY if label == "tempered-noisy" else 0.1)
        assert run.info.status == ("FAILED" if label == "crashing" else "FINISHED")


def test_failing_estimator_is_reported_and_exits_non_zero(reproduced: Reproduced) -> None:
    assert reproduced.result.exit_code == 1, reproduced.result.output
    crashing = next(row for row in _table(reproduced.report)[1:] if row[0] == "crashing")
    assert crashing[-1] == "FAILED: seeds 5, 6: RuntimeError: deliberate failure in forward"
    assert all(cell == "—" for cell in crashing[2:-2]) and crashing[-2] == "n/a"
    errors = {run.data.tags.get("lvzoo.reproduce_error") for run in _runs(reproduced) if run.info.status == "FAILED"}
    assert errors == {"RuntimeError: deliberate failure in forward"}


def test_report_only_rebuilds_the_same_table_from_mlflow(reproduced: Reproduced, repro_plugins: None) -> None:
    out = reproduced.out_dir / "rebuilt.md"
    args = ["reproduce", "--report-only", reproduced.reproduce_id, "--tracking-uri", reproduced.store.uri]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    rebuilt = out.read_text().splitlines()
    original = reproduced.report.splitlines()
    budget_line = next(i for i, line in enumerate(original) if line.startswith("**Budget:**"))
    assert rebuilt[:budget_line] + rebuilt[budget_line + 1 :] == original[:budget_line] + original[budget_line + 1 :]
    assert "(first run start to last run end)" in rebuilt[budget_line]
    assert _table(out.read_text()) == _table(reproduced.report)


def test_estimators_option_selects_names_and_variant_labels(repro_plugins: None) -> None:
    plan = plan_reproduction(
        "reprotoy", ["softmax", "tempered-noisy"], {"noise": "0.2"}, epochs=None, seeds=SEEDS, device="cpu",
        data_dir=None,
    )
    assert [(entry.label, entry.estimator) for entry in plan.entries] == [
        ("softmax", "softmax"),
        ("tempered-noisy", "tempered"),
    ]
    assert plan.entries[0].run_overrides == {"noise": "0.2"}
    assert plan.entries[1].run_overrides == {"task.noise": NOISY}  # the variant's own value wins
    assert plan.epochs == ReproToyTask.default_epochs
    assert plan.entries[0].settings["lr"] == "0.05"  # the task's paper default
    # Only the plugins this process registered at run time are handed to the workers.
    assert {(group, name) for group, name, _ in plan.runtime_plugins} == {
        ("lvzoo.tasks", "reprotoy"),
        ("lvzoo.estimators", "tempered"),
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "reprotoy", "--estimators", "tempered,nope"], "unknown estimator 'nope'"),
        (["--task", "reprotoy", "--seeds", "5,x"], "--seeds expects comma-separated integers"),
        (["--task", "reprotoy", "--set", "noise=loud"], "bad value for task.noise"),
        (["--task", "toy"], "task 'toy' declares no paper estimators"),
        (["--estimators", "tempered"], "--task is required"),
    ],
)
def test_configuration_errors_are_one_line_before_training(
    args: list[str], expected: str, repro_plugins: None, workdir: Path
) -> None:
    result = CliRunner().invoke(main, ["reproduce", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not list(workdir.iterdir())  # nothing trained or tracked


def test_format_cell_and_parse_seeds() -> None:
    assert format_cell([]) == "—"
    assert format_cell([2.0]) == "2"
    assert format_cell([1.0, 2.0, 4.0]) == f"{7 / 3:.4g} ± {statistics.stdev([1.0, 2.0, 4.0]):.2g}"
    assert parse_seeds(" 43, 44") == (43, 44)
    with pytest.raises(ConfigError, match="duplicates"):
        parse_seeds("1,1")
