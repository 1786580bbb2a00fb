"""``runner reproduce``: train a task's paper estimator set over several seeds in parallel and report a table.

Each (estimator label, seed) pair is one ordinary tracked run of :func:`lvzoo.runners.loop.train` in the task's
MLflow experiment, executed in a pool of spawned worker processes. Every run is tagged with the shared
``lvzoo.reproduce_id`` (:data:`REPRODUCE_TAG`), its row label, its seed and the JSON budget, so the report can be
rebuilt from MLflow alone (:func:`report_from_mlflow`). The table cells are the ``test_*`` metrics of the finished
runs as mean ± sample standard deviation over seeds.

Workers are fresh ``spawn`` processes: they see only installed entry points. Plugins that the parent process
resolved some other way (e.g. registered at run time) are handed to the workers as a temporary distribution
whose ``entry_points.txt`` maps the same names to the same ``module:QualName`` classes.
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import torch

import lvzoo
from lvzoo import registry
from lvzoo.estimators.base import EstimatorConfig
from lvzoo.runners.config import (
    TASK_PREFIX,
    ConfigError,
    config_to_dict,
    field_types,
    one_line,
    split_overrides,
)
from lvzoo.runners.loop import TerminatedError, class_path, plan_run, sigterm_raises, train
from lvzoo.runners.tracking import MlflowTracker, default_tracking_uri, sqlite_artifact_location
from lvzoo.tasks.base import Task, TaskConfig

REPRODUCE_TAG = "lvzoo.reproduce_id"
LABEL_TAG = "lvzoo.reproduce_label"
SEED_TAG = "lvzoo.reproduce_seed"
BUDGET_TAG = "lvzoo.reproduce_budget"
ERROR_TAG = "lvzoo.reproduce_error"
#: Test metrics that count decoder calls per example, by preference (tasks name them differently).
DECODER_CALL_METRICS = ("test_decoder_calls",)
DECODER_CALLS_HEADER = "decoder calls / example (test)"
#: Longest error message kept in a tag or a table cell.
MAX_ERROR_CHARS = 300
_PLUGIN_DIST = "lvzoo_reproduce_runtime_plugins-0.dist-info"


@attrs.frozen
class Entry:
    """One table row: ``label`` runs ``estimator`` with the task overrides ``variant`` (plus the user's)."""

    label: str
    estimator: str
    variant: Mapping[str, Any]
    run_overrides: Mapping[str, Any]
    settings: Mapping[str, str]


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
class Reproduction:
    """A validated reproduction plan (see :func:`plan_reproduction`)."""

    task: str
    paper_epochs: int
    epochs: int
    seeds: tuple[int, ...]
    overrides: Mapping[str, str]
    device: str
    data_dir: Path | None
    entries: tuple[Entry, ...]
    runtime_plugins: tuple[tuple[str, str, str], ...]


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


# --- planning -------------------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"43,44"`` -> ``(43, 44)``; refuses empty lists, non-integers and duplicates."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        seeds = tuple(int(item) for item in items)
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds expects at least one integer, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has duplicates: {text!r}")
    return seeds


def _task_field(key: str, task_fields: Mapping[str, Any]) -> str | None:
    """The task-config field a ``--set`` key addresses (``task.x`` or a bare task field ``x``), else ``None``."""
    name = key[len(TASK_PREFIX) :] if key.startswith(TASK_PREFIX) else key
    return name if name in task_fields else None


def _user_task_config(task_cls: type[Task[Any]], overrides: Mapping[str, str]) -> TaskConfig:
    """The task config of the user's task-level overrides alone (to ask the task for its paper variants)."""
    task_fields = field_types(task_cls.config_class)
    task_values = {key: value for key, value in overrides.items() if _task_field(key, task_fields) is not None}
    config, _ = split_overrides(task_values, task_cls.config_class, EstimatorConfig)
    return config


def _merge_variant(
    overrides: Mapping[str, str], variant: Mapping[str, Any], task_fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The user's overrides with the variant's task overrides on top (the variant defines the row)."""
    merged: dict[str, Any] = {
        key: value for key, value in overrides.items() if _task_field(key, task_fields) not in variant
    }
    merged.update({TASK_PREFIX + key: value for key, value in variant.items()})
    return merged


def _runtime_plugin(group: str, name: str, cls: type[Any]) -> tuple[str, str, str] | None:
    """``(group, name, "module:QualName")`` when no installed entry point registers ``cls`` as ``name``."""
    target = class_path(cls)
    for entry in importlib.metadata.entry_points(group=group, name=name):
        if entry.value.replace(" ", "") == target:
            return None
    return group, name, target


def plan_reproduction(
    task: str,
    estimators: Sequence[str] | None,
    overrides: Mapping[str, str],
    *,
    epochs: int | None,
    seeds: Sequence[int] | None,
    device: str,
    data_dir: Path | None,
) -> Reproduction:
    """Resolve the rows (paper estimators and variants, or the ``estimators`` names/labels) and validate every run.

    Every configuration error is a one-line :class:`ConfigError` raised before anything trains.
    """
    try:
        task_cls = registry.tasks.load(task)
    except (registry.UnknownNameError, registry.PluginLoadError) as exc:
        raise ConfigError(one_line(str(exc))) from None
    if not (isinstance(task_cls, type) and issubclass(task_cls, Task)):
        raise ConfigError(f"task {task!r} does not name a Task subclass")
    variants = task_cls.paper_variants(_user_task_config(task_cls, overrides))
    if estimators is None:
        labels = [*task_cls.paper_estimators, *variants]
        if not labels:
            raise ConfigError(f"task {task!r} declares no paper estimators; pass --estimators a,b,...")
    else:
        labels = list(estimators)
        if not labels:
            raise ConfigError("--estimators needs at least one estimator name or variant label")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--estimators has duplicates: {','.join(labels)}")
    task_fields = field_types(task_cls.config_class)
    run_epochs = task_cls.default_epochs if epochs is None else epochs
    entries: list[Entry] = []
    plugins: set[tuple[str, str, str]] = set()
    for label in labels:
        estimator, variant = variants.get(label, (label, {}))
        run_overrides = _merge_variant(overrides, variant, task_fields)
        plan = plan_run(task, estimator, run_overrides, epochs=run_epochs, seed=0, device=device, data_dir=data_dir)
        settings = {
            "lr": str(plan.task_config.lr),
            "batch_size": str(plan.task_config.batch_size),
            "entropy_coef": str(plan.task_config.entropy_coef),
        }
        settings.update({f"estimator.{k}": str(v) for k, v in config_to_dict(plan.estimator_config).items()})
        entries.append(Entry(label, estimator, dict(variant), run_overrides, settings))
        for group, name, cls in (
            (registry.tasks.group, task, plan.task_cls),
            (registry.estimators.group, estimator, plan.estimator_cls),
        ):
            plugin = _runtime_plugin(group, name, cls)
            if plugin is not None:
                plugins.add(plugin)
    return Reproduction(
        task=task,
        paper_epochs=task_cls.default_epochs,
        epochs=run_epochs,
        seeds=tuple(task_cls.paper_seeds if seeds is None else seeds),
        overrides=dict(overrides),
        device=device,
        data_dir=data_dir,
        entries=tuple(entries),
        runtime_plugins=tuple(sorted(plugins)),
    )


# --- workers --------------------------------------------------------------------------------------------------------


@attrs.frozen
class _RunSpec:
    """One run, as sent (pickled) to a worker process."""

    task: str
    label: str
    estimator: str
    seed: int
    overrides: Mapping[str, Any]
    epochs: int
    device: str
    data_dir: Path | None
    tracking_uri: str
    tags: Mapping[str, str]
    plugins: tuple[tuple[str, str, str], ...]


@attrs.frozen
class _Outcome:
    label: str
    seed: int
    run_id: str | None
    error: str | None
    seconds: float


class _ReproduceTracker(MlflowTracker):
    """An MLflow tracker that names the run ``<label>-<seed>`` and adds the reproduction tags at creation."""

    def __init__(self, tracking_uri: str, run_name: str, tags: Mapping[str, str]) -> None:
        super().__init__(tracking_uri)
        self.run_name = run_name
        self.extra_tags = dict(tags)
        self.started: str | None = None

    def start(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        self.started = super().start(experiment, self.run_name, {**tags, **self.extra_tags})
        return self.started


def _init_worker(threads: int, plugin_dir: str | None) -> None:
    """Worker initializer: torch intra-op threads, and the parent's run-time plugins on ``sys.path``."""
    torch.set_num_threads(threads)
    if plugin_dir is not None:
        sys.path.append(plugin_dir)


def _check_plugins(plugins: Iterable[tuple[str, str, str]]) -> None:
    """Refuse to run when this process resolves a name to another class than the parent did."""
    for group, name, target in plugins:
        reg = registry.tasks if group == registry.tasks.group else registry.estimators
        found = class_path(reg.load(name))
        if found != target:
            raise ConfigError(f"{reg.kind} {name!r} is {found} in the worker but {target} in the parent process")


def _short_error(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")[:MAX_ERROR_CHARS]


def _run_one(spec: _RunSpec) -> _Outcome:
    """Train one run in a worker; failures come back as an error string (and an error tag on the run)."""
    started = time.perf_counter()
    tracker: _ReproduceTracker | None = None
    try:
        _check_plugins(spec.plugins)
        tracker = _ReproduceTracker(spec.tracking_uri, f"{spec.label}-{spec.seed}", spec.tags)
        result = train(
            spec.task,
            spec.estimator,
            overrides=spec.overrides,
            epochs=spec.epochs,
            seed=spec.seed,
            device=spec.device,
            data_dir=spec.data_dir,
            tracker=tracker,
            progress=False,
        )
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM: train marked the run KILLED; take no further runs
        os._exit(128 + (signal.SIGTERM if isinstance(exc, TerminatedError) else signal.SIGINT))
    except Exception as exc:
        error = _short_error(exc)
        print(f"[reproduce] {spec.label} seed {spec.seed} failed:", file=sys.stderr)
        traceback.print_exc()
        run_id = tracker.started if tracker is not None else None
        if tracker is not None and run_id is not None:
            with suppress(Exception):
                tracker.client.set_tag(run_id, ERROR_TAG, error)
        return _Outcome(spec.label, spec.seed, run_id, error, time.perf_counter() - started)
    return _Outcome(spec.label, spec.seed, result.run_id, None, time.perf_counter() - started)


def _write_runtime_plugins(plugins: Sequence[tuple[str, str, str]], directory: Path) -> str | None:
    """A ``*.dist-info`` folder in ``directory`` registering ``plugins``; returns ``directory`` (None if none)."""
    if not plugins:
        return None
    dist = directory / _PLUGIN_DIST
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lvzoo-reproduce-runtime-plugins\nVersion: 0\n")
    groups: dict[str, list[str]] = {}
    for group, name, target in plugins:
        groups.setdefault(group, []).append(f"{name} = {target}")
    (dist / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "\n".join(lines) + "\n\n" for group, lines in groups.items())
    )
    return str(directory)


# --- running --------------------------------------------------------------------------------------------------------


def new_reproduce_id(task: str) -> str:
    """``<task>-<YYYYmmdd-HHMMSS>-<6 hex>``."""
    return f"{task}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _ensure_experiment(client: Any, tracking_uri: str, name: str) -> None:
    """Create the experiment (and migrate a new store) before workers race to do it."""
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=sqlite_artifact_location(tracking_uri))


def run_reproduction(
    plan: Reproduction,
    *,
    jobs: int | None = None,
    tracking_uri: str | None = None,
    reproduce_id: str | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> Report:
    """Train every (row, seed) of ``plan`` in ``min(jobs, runs)`` spawned workers and build the report from MLflow.

    ``jobs`` defaults to ``os.cpu_count()``; each worker uses ``max(1, cores // workers)`` torch threads. ``echo``
    receives one progress line per finished run. Failed runs do not raise: they are rows of the report.
    """
    uri = tracking_uri or default_tracking_uri()
    rid = reproduce_id or new_reproduce_id(plan.task)
    client = _client(uri)
    _ensure_experiment(client, uri, plan.task)
    cores = os.cpu_count() or 1
    total = len(plan.entries) * len(plan.seeds)
    workers = max(1, min(jobs or cores, total))
    threads = max(1, cores // workers)
    budget = Budget(
        task=plan.task,
        epochs=plan.epochs,
        paper_epochs=plan.paper_epochs,
        seeds=plan.seeds,
        overrides=dict(plan.overrides),
        device=plan.device,
        date=datetime.now().astimezone().isoformat(timespec="seconds"),
        lvzoo_version=lvzoo.__version__,
        workers=workers,
        threads=threads,
        entries=tuple(
            (e.label, e.estimator, {k: str(v) for k, v in e.variant.items()}, dict(e.settings)) for e in plan.entries
        ),
    )
    specs = [
        _RunSpec(
            task=plan.task,
            label=entry.label,
            estimator=entry.estimator,
            seed=seed,
            overrides=entry.run_overrides,
            epochs=plan.epochs,
            device=plan.device,
            data_dir=plan.data_dir,
            tracking_uri=uri,
            tags={REPRODUCE_TAG: rid, LABEL_TAG: entry.label, SEED_TAG: str(seed), BUDGET_TAG: budget.to_json()},
            plugins=plan.runtime_plugins,
        )
        for seed in plan.seeds
        for entry in plan.entries
    ]
    echo(
        f"reproduce {rid}: {_count(total, 'run')} ({_count(len(plan.entries), 'row')} x "
        f"{_count(len(plan.seeds), 'seed')}), {_count(workers, 'worker')} x {_count(threads, 'torch thread')}"
    )
    started = time.perf_counter()
    outcomes = _execute(specs, workers, threads, plan.runtime_plugins, echo)
    wall_time = time.perf_counter() - started
    records = _merge(_mlflow_records(client, rid, [plan.task]), outcomes)
    return Report(rid, uri, budget, _rows(budget, records), wall_time, wall_time_measured=True)


def _execute(
    specs: Sequence[_RunSpec],
    workers: int,
    threads: int,
    plugins: Sequence[tuple[str, str, str]],
    echo: Callable[[str], None],
) -> list[_Outcome]:
    """Run ``specs`` in a spawn pool; on SIGINT/SIGTERM the workers are terminated and the interrupt re-raised."""
    outcomes: list[_Outcome] = []
    with tempfile.TemporaryDirectory(prefix="lvzoo-reproduce-") as scratch:
        executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads, _write_runtime_plugins(plugins, Path(scratch))),
        )
        try:
            with sigterm_raises():
                futures: dict[Future[_Outcome], _RunSpec] = {executor.submit(_run_one, spec): spec for spec in specs}
                for future in as_completed(futures):
                    spec = futures[future]
                    try:
                        outcome = future.result()
                    except Exception as exc:  # the worker process died (e.g. killed for memory)
                        outcome = _Outcome(spec.label, spec.seed, None, f"worker failed: {_short_error(exc)}", 0.0)
                    outcomes.append(outcome)
                    status = f"FAILED: {outcome.error}" if outcome.error else f"finished (run {outcome.run_id})"
                    echo(f"[{len(outcomes)}/{len(specs)}] {spec.label} seed {spec.seed}: {status} "
                         f"in {outcome.seconds:.1f} s")
        except KeyboardInterrupt:  # also SIGTERM; running workers mark their runs KILLED on SIGTERM
            for process in list(executor._processes.values()):
                process.terminate()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    return outcomes


# --- collecting -----------------------------------------------------------------------------------------------------


def _mlflow_records(client: Any, reproduce_id: str, experiments: Sequence[str] | None) -> list[RunRecord]:
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


def _merge(records: Sequence[RunRecord], outcomes: Sequence[_Outcome]) -> list[RunRecord]:
    """MLflow's records, with the workers' errors (and failures that never created a run) added."""
    by_key = {(record.label, record.seed): record for record in records}
    for outcome in outcomes:
        key = (outcome.label, outcome.seed)
        known = by_key.get(key)
        if outcome.error is not None:
            base = known or RunRecord(outcome.label, outcome.seed, "FAILED", {})
            by_key[key] = attrs.evolve(base, status="FAILED" if base.status == "FINISHED" else base.status,
                                       error=outcome.error)
        elif known is None:
            by_key[key] = RunRecord(outcome.label, outcome.seed, "FAILED", {}, error="run not found in MLflow")
    return list(by_key.values())


def _rows(budget: Budget, records: Sequence[RunRecord]) -> tuple[Row, ...]:
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
    records = _mlflow_records(_client(uri), reproduce_id, [task] if task is not None else None)
    budget_json = next((record.budget_json for record in records if record.budget_json), None)
    if budget_json is None:
        raise ConfigError(f"no runs tagged {REPRODUCE_TAG}={reproduce_id!r} in {uri}")
    budget = Budget.from_json(budget_json)
    starts = [record.start_ms for record in records if record.start_ms is not None]
    ends = [record.end_ms for record in records if record.end_ms is not None]
    span = (max(ends) - min(starts)) / 1000 if starts and ends else 0.0
    return Report(reproduce_id, uri, budget, _rows(budget, records), span, wall_time_measured=False)


# --- rendering ------------------------------------------------------------------------------------------------------


def _count(number: int, noun: str) -> str:
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
        f"**Budget:** task `{budget.task}`; {_count(budget.epochs, 'epoch')} (paper: {budget.paper_epochs}); "
        f"seeds {seeds} ({len(budget.seeds)} per row); overrides: {_escape(_pairs(budget.overrides)) or 'none'}; "
        f"device {budget.device}; {_count(budget.workers, 'worker')} x {_count(budget.threads, 'torch thread')}; "
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
