"""The report of ``runner reproduce``: the runs' MLflow tags and test metrics aggregated into a markdown table.

Every run of a reproduction carries the shared :data:`REPRODUCE_TAG`, its row label, its seed and the JSON
:class:`Budget`, so the report can be rebuilt from MLflow alone (:func:`report_from_mlflow`). The table cells are
the ``test_*`` metrics of the finished runs as mean ± sample standard deviation over seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from lvzoo.runners.callbacks import default_tracking_uri
from lvzoo.runners.plan import ConfigError

REPRODUCE_TAG = "lvzoo.reproduce_id"
LABEL_TAG = "lvzoo.reproduce_label"
SEED_TAG = "lvzoo.reproduce_seed"
BUDGET_TAG = "lvzoo.reproduce_budget"
ERROR_TAG = "lvzoo.reproduce_error"
#: Test metrics that count decoder calls per example, by preference (tasks name them differently).
DECODER_CALL_METRICS = ("test_decoder_calls",)
DECODER_CALLS_HEADER = "decoder calls / example (test)"


@attrs.frozen
class Budget:
    """What a reproduction ran: stored as JSON in every run's :data:`BUDGET_TAG`."""

    task: str
    epochs: int
    paper_epochs: int
    seeds: tuple[int, ...]
    overrides: Mapping[str, str]
    device: str
    date: str
    lvzoo_version: str
    workers: int
    threads: int
    entries: tuple[tuple[str, str, Mapping[str, str], Mapping[str, str]], ...]

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> Budget:
        values = json.loads(text)
        values["seeds"] = tuple(values["seeds"])
        values["entries"] = tuple(tuple(entry) for entry in values["entries"])
        return cls(**values)


@attrs.frozen
class RunRecord:
    """One run as the report sees it: ``status`` is MLflow's (or ``FAILED`` for a run that never started)."""

    label: str
    seed: int
    status: str
    metrics: Mapping[str, float]
    error: str | None = None
    run_id: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    budget_json: str | None = None


@attrs.frozen
class Row:
    """Aggregated row: ``cells`` maps each test metric to its values over the finished seeds; ``failures`` maps
    each error message to the seeds that failed with it."""

    label: str
    estimator: str
    variant: Mapping[str, str]
    settings: Mapping[str, str]
    planned: int
    finished: int
    cells: Mapping[str, tuple[float, ...]]
    failures: Mapping[str, tuple[int, ...]]


@attrs.frozen
class Report:
    """Everything the markdown report shows."""

    reproduce_id: str
    tracking_uri: str
    budget: Budget
    rows: tuple[Row, ...]
    wall_time_s: float
    wall_time_measured: bool

    @property
    def failed(self) -> bool:
        return any(row.failures for row in self.rows)


def mlflow_client(tracking_uri: str) -> Any:
    """An :class:`mlflow.tracking.MlflowClient` (imported lazily: it is slow)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# --- collecting -----------------------------------------------------------------------------------------------------


def mlflow_records(client: Any, reproduce_id: str, experiments: Sequence[str] | None) -> list[RunRecord]:
    """The runs tagged ``reproduce_id`` in the named experiments (all experiments when ``None``)."""
    if experiments is None:
        ids = [experiment.experiment_id for experiment in _pages(client.search_experiments)]
    else:
        found = [client.get_experiment_by_name(name) for name in experiments]
        ids = [experiment.experiment_id for experiment in found if experiment is not None]
    if not ids:
        return []
    query = f"tags.`{REPRODUCE_TAG}` = '{reproduce_id}'"
    records = []
    for run in _pages(lambda **kw: client.search_runs(ids, filter_string=query, **kw)):
        tags = run.data.tags
        records.append(
            RunRecord(
                label=tags[LABEL_TAG],
                seed=int(tags[SEED_TAG]),
                status=str(run.info.status),
                metrics={k: float(v) for k, v in run.data.metrics.items() if k.startswith("test_")},
                error=tags.get(ERROR_TAG),
                run_id=str(run.info.run_id),
                start_ms=run.info.start_time,
                end_ms=run.info.end_time,
                budget_json=tags.get(BUDGET_TAG),
            )
        )
    return records


def _pages(search: Callable[..., Any]) -> list[Any]:
    """All items of a paged MLflow search."""
    items: list[Any] = []
    token = None
    while True:
        page = search(max_results=1000, page_token=token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def aggregate_rows(budget: Budget, records: Sequence[RunRecord]) -> tuple[Row, ...]:
    by_key = {(record.label, record.seed): record for record in records}
    rows = []
    for label, estimator, variant, settings in budget.entries:
        cells: dict[str, list[float]] = {}
        errors: dict[str, list[int]] = {}
        for seed in budget.seeds:
            record = by_key.get((label, seed))
            if record is not None and record.status == "FINISHED" and record.error is None:
                for key, value in record.metrics.items():
                    cells.setdefault(key, []).append(value)
                continue
            reason = "no run" if record is None else record.error or f"run {record.status}"
            errors.setdefault(reason, []).append(seed)
        rows.append(
            Row(
                label=label,
                estimator=estimator,
                variant=variant,
                settings=settings,
                planned=len(budget.seeds),
                finished=len(budget.seeds) - sum(len(seeds) for seeds in errors.values()),
                cells={key: tuple(values) for key, values in cells.items()},
                failures={reason: tuple(seeds) for reason, seeds in errors.items()},
            )
        )
    return tuple(rows)


def report_from_mlflow(reproduce_id: str, tracking_uri: str | None = None, task: str | None = None) -> Report:
    """Rebuild the report of an earlier reproduction from its tagged runs (wall time: first start to last end)."""
    uri = tracking_uri or default_tracking_uri()
    records = mlflow_records(mlflow_client(uri), reproduce_id, [task] if task is not None else None)
    budget_json = next((record.budget_json for record in records if record.budget_json), None)
    if budget_json is None:
        raise ConfigError(f"no runs tagged {REPRODUCE_TAG}={reproduce_id!r} in {uri}")
    budget = Budget.from_json(budget_json)
    starts = [record.start_ms for record in records if record.start_ms is not None]
    ends = [record.end_ms for record in records if record.end_ms is not None]
    span = (max(ends) - min(starts)) / 1000 if starts and ends else 0.0
    return Report(reproduce_id, uri, budget, aggregate_rows(budget, records), span, wall_time_measured=False)


# --- rendering ------------------------------------------------------------------------------------------------------


def count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


def format_cell(values: Sequence[float]) -> str:
    """``mean ± sample std`` (4 and 2 significant digits); only the mean for one value; ``—`` for none."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _pairs(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def _status(row: Row) -> str:
    """``ok`` or ``FAILED: seeds 43, 44: <error>; ...``."""
    if not row.failures:
        return "ok"
    parts = [
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: {reason}"
        for reason, seeds in row.failures.items()
    ]
    return "FAILED: " + "; ".join(parts)


def render_report(report: Report) -> str:
    """The markdown report: title, budget, the table, how cells are computed and the per-row settings."""
    budget = report.budget
    metric_names = sorted({key for row in report.rows for key in row.cells})
    decoder_metric = next((name for name in DECODER_CALL_METRICS if name in metric_names), None)
    columns = [name for name in metric_names if name != decoder_metric]
    seeds = ", ".join(map(str, budget.seeds))
    wall = _duration(report.wall_time_s) + ("" if report.wall_time_measured else " (first run start to last run end)")
    lines = [
        f"# lvzoo paper reproduction: {budget.task}",
        "",
        f"**Budget:** task `{budget.task}`; {count(budget.epochs, 'epoch')} (paper: {budget.paper_epochs}); "
        f"seeds {seeds} ({len(budget.seeds)} per row); overrides: {_escape(_pairs(budget.overrides)) or 'none'}; "
        f"device {budget.device}; {count(budget.workers, 'worker')} x {count(budget.threads, 'torch thread')}; "
        f"date {budget.date}; lvzoo {budget.lvzoo_version}; wall time {wall}.",
        "",
        f"Reproduce id `{report.reproduce_id}` (tag `{REPRODUCE_TAG}`) in MLflow `{report.tracking_uri}`, "
        f"experiment `{budget.task}`.",
        "",
        "| estimator | runs | " + " | ".join(name.removeprefix("test_") for name in columns)
        + f"{' | ' if columns else ''}{DECODER_CALLS_HEADER} | status |",
        "|" + "---|" * (len(columns) + 4),
    ]
    for row in report.rows:
        cells = [format_cell(row.cells.get(name, ())) for name in columns]
        calls = format_cell(row.cells.get(decoder_metric, ())) if decoder_metric else "n/a"
        lines.append(
            f"| {_escape(row.label)} | {row.finished}/{row.planned} | " + " | ".join(cells)
            + f"{' | ' if cells else ''}{calls} | {_escape(_status(row))} |"
        )
    decoder_note = (
        f"`{decoder_metric}`" if decoder_metric else "not reported: the task logs no test decoder-call metric"
    )
    lines += [
        "",
        f"Cells: the runs' `test_*` metrics (the task's final test protocol) as mean ± sample standard deviation "
        f"over the finished seeds (mean only for one seed). {DECODER_CALLS_HEADER}: {decoder_note}.",
        "",
        "Settings (the task's paper hyper-parameters for each estimator, after overrides):",
        "",
    ]
    for row in report.rows:
        variant = f" = `{row.estimator}` with {_pairs(row.variant)}" if row.variant else ""
        lines.append(f"- `{row.label}`{variant}: {_pairs(row.settings)}")
    return "\n".join(lines) + "\n"
