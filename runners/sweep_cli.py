"""``runner sweep``: the click command (the work is in :mod:`lvzoo.runners.sweep`, imported only when it runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lvzoo.runners.cli_common import (
    OneLineError,
    data_dir_option,
    device_option,
    interrupt_exit,
    parse_assignments,
    tracking_uri_option,
)
from lvzoo.runners.errors import ConfigError

#: Options shared with ``runner reproduce`` (where to run and what each run may use).
address_option = click.option(
    "--address",
    default=None,
    metavar="ADDR",
    help="Ray cluster: local (a new local instance sized to this machine; the default), auto (the one `ray start` "
    "started here), HOST:PORT of the head node or ray://HOST:10001; reproduce also takes pool (a process pool of "
    "--jobs workers, no Ray).")


def _seeds(text: str | None) -> tuple[int, ...]:
    from lvzoo.runners.reproduce_plan import parse_seeds

    return (0,) if text is None else parse_seeds(text)


@click.command("sweep")
@click.option("--task", "task_name", metavar="T", help="Registered task name.")
@click.option("--estimator", "estimator_name", metavar="E", help="Registered estimator name.")
@click.option(
    "--grid",
    "grid",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="A searched config key and its values (or uniform|loguniform|randint:LOW:HIGH with --search random or "
    "optuna). Repeatable: the grid is every combination.",
)
@click.option("--seeds", "seeds_text", default=None, metavar="S1,S2,...", help="Seeds: one more grid dimension.")
@click.option("--samples", type=int, default=1, show_default=True, help="Samples (random/optuna) or grid repeats.")
@click.option("--search", type=click.Choice(["grid", "random", "optuna"]), default="grid", show_default=True)
@click.option("--scheduler", type=click.Choice(["none", "asha"]), default="none", show_default=True)
@click.option("--grace-period", type=int, default=1, show_default=True, help="ASHA: epochs before stopping a trial.")
@click.option("--metric", default=None, help="Selection metric (default: the task's, e.g. val_neg_elbo).")
@click.option("--mode", type=click.Choice(["min", "max"]), default=None, help="Minimise or maximise --metric.")
@address_option
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True)
@click.option("--gpus-per-trial", type=float, default=0.0, show_default=True)
@click.option("--max-concurrent", type=int, default=None, help="Most trials at once (default: what fits).")
@click.option("--max-failures", type=int, default=2, show_default=True, help="Retries of a trial whose worker died.")
@click.option("--epochs", type=int, default=None, help="Epochs per trial (default: the task's paper value).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Override for every trial.")
@device_option
@tracking_uri_option
@data_dir_option
@click.option(
    "--storage-path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where sweeps keep Ray Tune state, checkpoints and run dirs; shared by all nodes (default: ./sweeps).",
)
@click.option("--name", default=None, help="Sweep name (default: <task>-<estimator>-<time>-<hex>).")
@click.option("--resume", default=None, metavar="SWEEP", help="Continue an interrupted sweep (its dir or name).")
def sweep_command(
    task_name: str | None,
    estimator_name: str | None,
    grid: tuple[str, ...],
    seeds_text: str | None,
    samples: int,
    search: str,
    scheduler: str,
    grace_period: int,
    metric: str | None,
    mode: str | None,
    address: str | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
    max_concurrent: int | None,
    max_failures: int,
    epochs: int | None,
    assignments: tuple[str, ...],
    device: str,
    tracking_uri: str | None,
    data_dir: Path | None,
    storage_path: Path | None,
    name: str | None,
    resume: str | None,
) -> None:
    """Sweep TASK x ESTIMATOR over --grid and --seeds on Ray Tune; every trial is a tracked lvzoo run.

    Prints the results table (also logged to the sweep's parent MLflow run); exits 1 when a trial failed and
    130 when interrupted (continue with --resume).
    """
    from lvzoo.runners.sweep import load_sweep, plan_sweep, run_sweep
    from lvzoo.runners.sweep_report import render_table

    try:
        if resume is not None:
            if task_name or estimator_name or grid or assignments:
                raise OneLineError("--resume continues a stored sweep: drop --task, --estimator, --grid and --set")
            config = load_sweep(resume, storage_path)
        else:
            if task_name is None or estimator_name is None:
                raise OneLineError("--task and --estimator are required (or --resume SWEEP)")
            config = plan_sweep(
                task_name,
                estimator_name,
                grid=grid,
                seeds=_seeds(seeds_text),
                overrides=parse_assignments(assignments),
                epochs=epochs,
                search=search,  # type: ignore[arg-type]
                samples=samples,
                scheduler=scheduler,
                grace_period=grace_period,
                metric=metric,
                mode=mode,
                cpus_per_trial=cpus_per_trial,
                gpus_per_trial=gpus_per_trial,
                max_concurrent=max_concurrent,
                max_failures=max_failures,
                device=device,
                data_dir=data_dir,
                tracking_uri=tracking_uri,
                storage_path=storage_path,
                name=name,
            )
        outcome = run_sweep(
            config, address=address, resume=resume is not None, echo=lambda line: click.echo(line, err=True)
        )
    except ConfigError as exc:
        raise OneLineError(str(exc)) from None
    except KeyboardInterrupt as exc:
        click.echo(f"interrupted: {type(exc).__name__}; continue with runner sweep --resume <sweep dir>", err=True)
        sys.exit(interrupt_exit(exc))
    click.echo(render_table(outcome))
    click.echo(f"sweep dir {outcome.sweep.sweep_dir}; wall time {outcome.wall_time_s:.1f} s", err=True)
    if outcome.interrupted:
        click.echo(f"interrupted; continue with: runner sweep --resume {outcome.sweep.sweep_dir}", err=True)
        sys.exit(130)
    if outcome.failed:
        sys.exit(1)
