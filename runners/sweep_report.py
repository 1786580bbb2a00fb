"""The results of ``runner sweep``: one row per trial, the best trial, and the parent run's table and tags.

Trial statuses: ``FINISHED`` (every epoch and the test), ``STOPPED`` (stopped early by the scheduler: its MLflow
run is tagged ``lvzoo.sweep.stopped_early`` and marked KILLED) and ``ERROR`` (failed after its retries).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lvzoo.runners.callbacks import MlflowTracker
from lvzoo.runners.plan import one_line
from lvzoo.runners.sweep_space import SEED_KEY
from lvzoo.runners.sweep_trial import EPOCH_KEY, RUN_ID_FILE, RUN_ID_KEY, STOPPED_EARLY_TAG, SweepConfig

RESULTS_NAME = "sweep_results"


@attrs.frozen
class TrialRow:
    trial_id: str
    run_id: str | None
    status: str
    epochs: int
    config: Mapping[str, Any]
    metrics: Mapping[str, float]
    error: str | None = None


@attrs.frozen
class SweepOutcome:
    """What :func:`run_sweep` did: the rows of the results table, the best trial and whether it was interrupted."""

    sweep: SweepConfig
    rows: tuple[TrialRow, ...]
    best: TrialRow | None
    interrupted: bool
    wall_time_s: float

    @property
    def failed(self) -> bool:
        return any(row.status == "ERROR" for row in self.rows)


def trial_rows(results: Any, sweep: SweepConfig, *, fix_runs: bool) -> list[TrialRow]:
    """One row per trial; early-stopped trials' runs are tagged and, if still open, marked KILLED."""
    client = MlflowTracker(sweep.tracking_uri).client
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        run_id = metrics.get(RUN_ID_KEY)
        if run_id is None and (sweep.trial_dir(trial_id) / RUN_ID_FILE).is_file():
            run_id = (sweep.trial_dir(trial_id) / RUN_ID_FILE).read_text().strip()
        epochs = int(metrics.get(EPOCH_KEY, 0))
        status = "ERROR" if result.error is not None else "FINISHED" if epochs >= sweep.epochs else "STOPPED"
        if run_id is not None and fix_runs and status != "FINISHED":
            run = client.get_run(run_id)
            if status == "STOPPED":
                client.set_tag(run_id, STOPPED_EARLY_TAG, "true")
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED" if status == "STOPPED" else "FAILED")
        numbers = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and (k.startswith(("val_", "test_", "train_")) or k == sweep.metric)
        }
        config = dict(result.config or {})
        error = one_line(str(result.error))[:300] if result.error is not None else None
        rows.append(TrialRow(trial_id, run_id, status, epochs, config, numbers, error))
    return sorted(rows, key=lambda row: row.trial_id)


def best_trial(rows: Sequence[TrialRow], sweep: SweepConfig) -> TrialRow | None:
    """The trial with the best last-reported metric among those that completed every epoch."""
    scored = [
        row for row in rows if row.status == "FINISHED" and math.isfinite(row.metrics.get(sweep.metric, math.nan))
    ]
    if not scored:
        return None
    sign = 1.0 if sweep.mode == "min" else -1.0
    return min(scored, key=lambda row: sign * row.metrics[sweep.metric])


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def results_table(outcome: SweepOutcome) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: trial, run, status, epochs, the searched values, the metrics."""
    keys = [dim.key for dim in outcome.sweep.space.dimensions] + [SEED_KEY]
    metric_names = sorted({name for row in outcome.rows for name in row.metrics if name.startswith("test_")})
    selection = outcome.sweep.metric
    header = ["trial", "run", "status", "epochs", *keys, selection, *[m for m in metric_names if m != selection]]
    body = []
    for row in outcome.rows:
        cells = [row.trial_id, row.run_id or "", row.status, str(row.epochs)]
        cells += [_cell(row.config.get(key, "")) for key in keys]
        cells += [f"{row.metrics[name]:.6g}" if name in row.metrics else "" for name in header[len(cells) :]]
        body.append(cells)
    return header, body


def render_table(outcome: SweepOutcome) -> str:
    header, body = results_table(outcome)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    best = outcome.best
    sweep = outcome.sweep
    if best is None:
        verdict = "No trial completed every epoch with a finite selection metric."
    else:
        config = ", ".join(f"{key}={value}" for key, value in best.config.items())
        verdict = (
            f"Best trial {best.trial_id} (run {best.run_id}): {sweep.metric} = {best.metrics[sweep.metric]:.6g} "
            f"({sweep.mode}); config {config}"
        )
    errors = [f"- trial {row.trial_id}: {row.error}" for row in outcome.rows if row.error]
    if errors:
        verdict += "\n\nFailed trials (Ray Tune's error.txt in the sweep dir has the traceback):\n" + "\n".join(errors)
    title = f"# Sweep {outcome.sweep.name}: {outcome.sweep.task} x {outcome.sweep.estimator}"
    return "\n".join([title, "", *lines, "", verdict]) + "\n"


def finish_parent(parent: MlflowTracker, outcome: SweepOutcome) -> None:
    directory = outcome.sweep.sweep_dir
    header, body = results_table(outcome)
    with (directory / f"{RESULTS_NAME}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)
    (directory / f"{RESULTS_NAME}.md").write_text(render_table(outcome))
    for suffix in ("csv", "md"):
        parent.log_artifact(directory / f"{RESULTS_NAME}.{suffix}")
    best = outcome.best
    if best is not None:
        config = dict(best.config)
        (directory / "best_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        parent.log_artifact(directory / "best_config.json")
        parent.set_tags(
            {
                "lvzoo.sweep.best_trial": best.trial_id,
                "lvzoo.sweep.best_run_id": best.run_id or "",
                "lvzoo.sweep.best_config": json.dumps(config, default=str),
            }
        )
        parent.log_metrics({f"best_{outcome.sweep.metric}": best.metrics[outcome.sweep.metric]}, step=0)
    parent.log_metrics(
        {
            "trials_finished": sum(r.status == "FINISHED" for r in outcome.rows),
            "trials_stopped_early": sum(r.status == "STOPPED" for r in outcome.rows),
            "trials_failed": sum(r.status == "ERROR" for r in outcome.rows),
            "sweep_wall_time_s": outcome.wall_time_s,
        },
        step=0,
    )
    parent.end("KILLED" if outcome.interrupted else "FAILED" if outcome.failed else "FINISHED")
