"""``runner sweep``: a hyper-parameter sweep of one task and estimator on Ray Tune, tracked in MLflow.

:func:`plan_sweep` validates everything before any trial starts (the task/estimator pair, every grid point, the
selection metric, the storage path); :func:`run_sweep` joins or starts the Ray cluster
(:mod:`lvzoo.runners.ray_cluster`), opens the sweep's parent MLflow run (search space as params), runs the trials
(:mod:`lvzoo.runners.sweep_trial`) and finishes the parent run with the best trial and a results table
(``sweep_results.md`` / ``.csv``). The sweep's directory ``<storage path>/<name>`` holds Ray Tune's experiment
state, ``sweep.json`` and every trial's run dir; ``--resume <sweep dir>`` restores it with
:meth:`ray.tune.Tuner.restore`, which reruns only the unfinished trials.
"""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lvzoo import registry
from lvzoo.runners.callbacks import MlflowTracker, default_tracking_uri
from lvzoo.runners.plan import ConfigError, RunPlan
from lvzoo.runners.ray_cluster import (
    check_resources,
    cluster_cpus,
    connected,
    require_ray,
    runtime_plugins,
    write_plugin_dir,
)
from lvzoo.runners.sweep_report import SweepOutcome, best_trial, finish_parent, trial_rows
from lvzoo.runners.sweep_space import Planner, Search, check_metric, parse_space
from lvzoo.runners.sweep_trial import (
    EPOCH_KEY,
    ROLE_TAG,
    SWEEP_TAG,
    SweepConfig,
    run_trial,
)

SWEEP_FILE = "sweep.json"


def new_sweep_name(task: str, estimator: str) -> str:
    return f"{task}-{estimator}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _probe(plan: RunPlan, metric: str | None) -> None:
    """Build the first grid point's task, model and estimator on the CPU (refusing an incompatible pair or missing
    data before any trial) and, for a given ``metric``, check that one validation pass reports it."""
    from lvzoo.runners.trainer import build, evaluate

    components = build(plan)
    if metric is not None:
        check_metric(metric, [f"val_{key}" for key in evaluate(components, "val", final=False)])


def plan_sweep(
    task: str,
    estimator: str,
    *,
    grid: Sequence[str],
    seeds: Sequence[int],
    overrides: Mapping[str, str],
    epochs: int | None,
    search: Search = "grid",
    samples: int = 1,
    scheduler: str = "none",
    grace_period: int = 1,
    metric: str | None = None,
    mode: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    max_concurrent: int | None = None,
    max_failures: int = 2,
    device: str = "cpu",
    data_dir: Path | None = None,
    tracking_uri: str | None = None,
    storage_path: Path | None = None,
    name: str | None = None,
) -> SweepConfig:
    """Validate a sweep; every problem is a one-line :class:`ConfigError` raised before anything runs."""
    planner = Planner(task, estimator, dict(overrides), epochs, data_dir)
    space, plans = parse_space(planner, grid, seeds, search, samples)
    first = plans[0]
    default_metric, default_mode = first.task_cls.selection_metric
    _probe(first, metric)
    if metric is None:
        metric, mode = default_metric, mode or default_mode
    elif mode is None:
        raise ConfigError(f"--metric {metric} needs --mode min or --mode max")
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max, got {mode!r}")
    if search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("--search optuna needs Optuna; install it: pip install optuna") from None
    if scheduler not in ("none", "asha"):
        raise ConfigError(f"--scheduler must be none or asha, got {scheduler!r}")
    if scheduler == "asha" and not 1 <= grace_period <= first.epochs:
        raise ConfigError(f"--grace-period must be between 1 and the {first.epochs} epochs")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise ConfigError("--cpus-per-trial must be positive and --gpus-per-trial non-negative")
    if gpus_per_trial > 0 and not device.startswith(("cuda", "auto")):
        raise ConfigError("--gpus-per-trial needs --device cuda or auto (the trials would ignore their GPUs)")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be a positive int, got {max_concurrent}")
    if max_failures < 0:
        raise ConfigError(f"--max-failures must be >= 0, got {max_failures}")
    storage = (storage_path or Path.cwd() / "sweeps").resolve()
    sweep_name = name or new_sweep_name(first.task_name, first.estimator_name)
    if (storage / sweep_name).exists():
        raise ConfigError(f"sweep {str(storage / sweep_name)!r} exists; continue it with --resume")
    require_ray()
    plugins = runtime_plugins(
        [
            (registry.tasks.group, first.task_name, first.task_cls),
            (registry.estimators.group, first.estimator_name, first.estimator_cls),
        ]
    )
    return SweepConfig(
        name=sweep_name,
        task=first.task_name,
        estimator=first.estimator_name,
        overrides=dict(overrides),
        epochs=first.epochs,
        device=device,
        data_dir=str(data_dir.resolve()) if data_dir is not None else None,
        tracking_uri=tracking_uri or default_tracking_uri(),
        storage_path=str(storage),
        space=space,
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        grace_period=grace_period,
        max_concurrent=max_concurrent,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        max_failures=max_failures,
        plugins=plugins,
    )


def load_sweep(resume: str, storage_path: Path | None) -> SweepConfig:
    """The stored config of the sweep at ``resume`` (its directory, or its name under the storage path)."""
    candidate = Path(resume)
    if not (candidate / SWEEP_FILE).is_file():
        candidate = (storage_path or Path.cwd() / "sweeps") / resume
    if not (candidate / SWEEP_FILE).is_file():
        raise ConfigError(f"no sweep to resume at {resume!r} (no {SWEEP_FILE} there or under the storage path)")
    return SweepConfig.from_json((candidate / SWEEP_FILE).read_text())


def _tuner(sweep: SweepConfig, resume: bool) -> Any:
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep), {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    )
    if resume:
        if not tune.Tuner.can_restore(str(sweep.sweep_dir)):
            raise ConfigError(f"sweep {str(sweep.sweep_dir)!r} has no Ray Tune state to restore")
        return tune.Tuner.restore(str(sweep.sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr=EPOCH_KEY, max_t=sweep.epochs, grace_period=sweep.grace_period, reduction_factor=2
        )
    search_alg = None
    if sweep.space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    return tune.Tuner(
        trainable,
        param_space=sweep.space.param_space(),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.space.samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=sweep.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=sweep.storage_path,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=0,
        ),
    )


def _unfinished(sweep: SweepConfig) -> int:
    """Trials that Ray Tune's saved experiment state would continue on restore (an interrupted sweep has some;
    the in-memory results of an interrupted run show them as terminated)."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(sweep.sweep_dir)).trials
    return sum(trial.status not in ("TERMINATED", "ERROR") for trial in trials)


def _parent(sweep: SweepConfig, resume: bool) -> tuple[SweepConfig, MlflowTracker]:
    """Open (or reopen) the parent run; a new sweep's config gets its id and is written to ``sweep.json``."""
    tracker = MlflowTracker(sweep.tracking_uri)
    if resume and sweep.parent_run_id is not None:
        tracker.resume(sweep.parent_run_id)
        return sweep, tracker
    run_id = tracker.start(
        sweep.task,
        f"sweep-{sweep.name}",
        {SWEEP_TAG: sweep.name, ROLE_TAG: "parent", "lvzoo.sweep.dir": str(sweep.sweep_dir)},
    )
    sweep = attrs.evolve(sweep, parent_run_id=run_id)
    params = {
        "task": sweep.task,
        "estimator": sweep.estimator,
        "epochs": str(sweep.epochs),
        "metric": sweep.metric,
        "mode": sweep.mode,
        "scheduler": sweep.scheduler,
        **sweep.space.to_params(),
    }
    params.update({f"set.{key}": value for key, value in sweep.overrides.items()})
    tracker.log_params(params)
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / SWEEP_FILE).write_text(sweep.to_json() + "\n")
    tracker.log_artifact(sweep.sweep_dir / SWEEP_FILE)
    write_plugin_dir(sweep.plugins, sweep.sweep_dir / "plugins")
    return sweep, tracker


def run_sweep(
    sweep: SweepConfig,
    *,
    address: str | None = None,
    resume: bool = False,
    echo: Callable[[str], None] = lambda line: None,
) -> SweepOutcome:
    """Run (or, with ``resume``, continue) ``sweep`` on the Ray cluster at ``address`` (None: a local instance)."""
    with connected(address) as ray:
        check_resources(ray, sweep.cpus_per_trial, sweep.gpus_per_trial)
        sweep, parent = _parent(sweep, resume)
        echo(
            f"sweep {sweep.name}: parent run {parent.run_id}, storage {sweep.sweep_dir}, "
            f"{cluster_cpus(ray)} cluster CPUs, {sweep.cpus_per_trial:g} per trial"
        )
        started = time.perf_counter()
        previous = signal.getsignal(signal.SIGINT)
        try:
            tuner = _tuner(sweep, resume)
            results = tuner.fit()
        except BaseException:
            parent.end("KILLED")
            raise
        finally:  # Ray Tune leaves its own SIGINT handler installed
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, previous)
        wall = time.perf_counter() - started
        interrupted = _unfinished(sweep) > 0
        rows = trial_rows(results, sweep, fix_runs=not interrupted)
    best = best_trial(rows, sweep)
    outcome = SweepOutcome(sweep, tuple(rows), best, interrupted, wall)
    finish_parent(parent, outcome)
    return outcome
