"""Executing ``runner reproduce``: every (row, seed) as one ordinary tracked :func:`~lvzoo.runners.trainer.train` run in
a pool of spawned worker processes, then the report built from MLflow.

Workers are fresh ``spawn`` processes: they see only installed entry points. Plugins that the parent process
resolved some other way (e.g. registered at run time) are handed to the workers as a temporary distribution
whose ``entry_points.txt`` maps the same names to the same ``module:QualName`` classes.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import ExitStack, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import torch

import lvzoo
from lvzoo import registry
from lvzoo.runners.callbacks import MlflowTracker, default_tracking_uri, sqlite_artifact_location
from lvzoo.runners.plan import ConfigError, one_line
from lvzoo.runners.process import TerminatedError, sigterm_raises
from lvzoo.runners.ray_cluster import check_resources, cluster_cpus, connected, use_plugin_dir, write_plugin_dir
from lvzoo.runners.reproduce_plan import Reproduction
from lvzoo.runners.reproduce_report import (
    BUDGET_TAG,
    ERROR_TAG,
    LABEL_TAG,
    REPRODUCE_TAG,
    SEED_TAG,
    Budget,
    Report,
    RunRecord,
    aggregate_rows,
    count,
    mlflow_client,
    mlflow_records,
)
from lvzoo.runners.trainer import train

#: Longest error message kept in a tag or a table cell.
MAX_ERROR_CHARS = 300


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
    #: Where the run dir goes (``<run_root>/<reproduce id>-<label>-<seed>``); None: ``<cwd>/runs/<run id>``.
    run_root: Path | None = None


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
        found = registry.class_path(reg.load(name))
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
            run_dir=None
            if spec.run_root is None
            else spec.run_root / f"{spec.tags[REPRODUCE_TAG]}-{spec.label}-{spec.seed}",
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


def new_reproduce_id(task: str) -> str:
    """``<task>-<YYYYmmdd-HHMMSS>-<6 hex>``."""
    return f"{task}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


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
    address: str | None = None,
    cpus_per_run: float = 1.0,
    gpus_per_run: float = 0.0,
) -> Report:
    """Train every (row, seed) of ``plan`` in ``min(jobs, runs)`` spawned workers and build the report from MLflow.

    ``jobs`` defaults to ``os.cpu_count()``; each worker uses ``max(1, cores // workers)`` torch threads. ``echo``
    receives one progress line per finished run. Failed runs do not raise: they are rows of the report.

    With an ``address`` (:func:`lvzoo.runners.ray_cluster.connected`; ``"local"`` starts a local Ray instance) the
    runs are Ray tasks of ``cpus_per_run`` CPUs (``int(cpus_per_run)`` torch threads) and ``gpus_per_run`` GPUs on
    that cluster instead, with run dirs under ``<cwd>/runs``; ``jobs`` is then ignored.
    """
    with ExitStack() as stack:
        ray = None if address is None else stack.enter_context(connected(address))
        return _reproduce(plan, jobs, tracking_uri, reproduce_id, echo, ray, cpus_per_run, gpus_per_run)


def _reproduce(
    plan: Reproduction,
    jobs: int | None,
    tracking_uri: str | None,
    reproduce_id: str | None,
    echo: Callable[[str], None],
    ray: Any,
    cpus_per_run: float,
    gpus_per_run: float,
) -> Report:
    uri = tracking_uri or default_tracking_uri()
    rid = reproduce_id or new_reproduce_id(plan.task)
    client = mlflow_client(uri)
    _ensure_experiment(client, uri, plan.task)
    total = len(plan.entries) * len(plan.seeds)
    if ray is None:
        cores = os.cpu_count() or 1
        workers = max(1, min(jobs or cores, total))
        threads = max(1, cores // workers)
    else:
        check_resources(ray, cpus_per_run, gpus_per_run)
        workers = max(1, min(total, int(cluster_cpus(ray) // cpus_per_run)))
        threads = max(1, int(cpus_per_run))
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
            run_root=None if ray is None else Path.cwd().resolve() / "runs",
        )
        for seed in plan.seeds
        for entry in plan.entries
    ]
    echo(
        f"reproduce {rid}: {count(total, 'run')} ({count(len(plan.entries), 'row')} x "
        f"{count(len(plan.seeds), 'seed')}), {count(workers, 'worker')} x {count(threads, 'torch thread')}"
    )
    started = time.perf_counter()
    if ray is None:
        outcomes = _execute(specs, workers, threads, plan.runtime_plugins, echo)
    else:
        outcomes = _execute_ray(ray, specs, threads, cpus_per_run, gpus_per_run, plan.runtime_plugins, echo)
    wall_time = time.perf_counter() - started
    records = _merge(mlflow_records(client, rid, [plan.task]), outcomes)
    return Report(rid, uri, budget, aggregate_rows(budget, records), wall_time, wall_time_measured=True)


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
            initargs=(threads, write_plugin_dir(plugins, Path(scratch))),
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
                    _echo_outcome(echo, len(outcomes), len(specs), spec, outcome)
        except KeyboardInterrupt:  # also SIGTERM; running workers mark their runs KILLED on SIGTERM
            for process in list(executor._processes.values()):
                process.terminate()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    return outcomes


def _run_one_ray(spec: _RunSpec, threads: int, plugin_dir: str | None) -> _Outcome:
    """A Ray task: :func:`_run_one` with the worker's torch threads and the parent's run-time plugins."""
    torch.set_num_threads(threads)
    use_plugin_dir(plugin_dir)
    return _run_one(spec)


def _echo_outcome(echo: Callable[[str], None], done: int, total: int, spec: _RunSpec, outcome: _Outcome) -> None:
    status = f"FAILED: {outcome.error}" if outcome.error else f"finished (run {outcome.run_id})"
    echo(f"[{done}/{total}] {spec.label} seed {spec.seed}: {status} in {outcome.seconds:.1f} s")


def _execute_ray(
    ray: Any,
    specs: Sequence[_RunSpec],
    threads: int,
    cpus: float,
    gpus: float,
    plugins: Sequence[tuple[str, str, str]],
    echo: Callable[[str], None],
) -> list[_Outcome]:
    """Run ``specs`` as Ray tasks; on SIGINT/SIGTERM the tasks are cancelled and the interrupt re-raised.

    The run-time plugins' folder is a temporary one of this machine (on a multi-node cluster, install plugins on
    every node)."""
    outcomes: list[_Outcome] = []
    with tempfile.TemporaryDirectory(prefix="lvzoo-reproduce-") as scratch:
        plugin_dir = write_plugin_dir(plugins, Path(scratch))
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_run_one_ray)
        refs = {task.remote(spec, threads, plugin_dir): spec for spec in specs}
        pending = list(refs)
        try:
            with sigterm_raises():
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    spec = refs[done[0]]
                    try:
                        outcome = ray.get(done[0])
                    except Exception as exc:  # the worker process died
                        outcome = _Outcome(spec.label, spec.seed, None, f"worker failed: {_short_error(exc)}", 0.0)
                    outcomes.append(outcome)
                    _echo_outcome(echo, len(outcomes), len(specs), spec, outcome)
        except KeyboardInterrupt:
            for ref in pending:
                with suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
    return outcomes


def _merge(records: Sequence[RunRecord], outcomes: Sequence[_Outcome]) -> list[RunRecord]:
    """MLflow's records, with the workers' errors (and failures that never created a run) added."""
    by_key = {(record.label, record.seed): record for record in records}
    for outcome in outcomes:
        key = (outcome.label, outcome.seed)
        known = by_key.get(key)
        if outcome.error is not None:
            base = known or RunRecord(outcome.label, outcome.seed, "FAILED", {})
            by_key[key] = attrs.evolve(
                base, status="FAILED" if base.status == "FINISHED" else base.status, error=outcome.error
            )
        elif known is None:
            by_key[key] = RunRecord(outcome.label, outcome.seed, "FAILED", {}, error="run not found in MLflow")
    return list(by_key.values())
