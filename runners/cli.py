"""The ``runner`` command line: train a registered task with a registered estimator, list plugins, evaluate.

``runner --task T --estimator E [--set key=value ...]`` trains and tracks one run; ``runner list`` shows what
is installed; ``runner eval CHECKPOINT`` evaluates a checkpoint. Configuration problems exit non-zero with a
single ``Error: ...`` line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lvzoo import registry
from lvzoo.runners.cli_common import DEBUG_ENV
from lvzoo.runners.cli_common import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from lvzoo.runners.cli_common import EXIT_TERMINATED as EXIT_TERMINATED
from lvzoo.runners.cli_common import EXIT_USAGE as EXIT_USAGE
from lvzoo.runners.cli_common import Group as _Group
from lvzoo.runners.cli_common import OneLineError as _OneLineError
from lvzoo.runners.cli_common import data_dir_option as _data_dir_option
from lvzoo.runners.cli_common import device_option as _device_option
from lvzoo.runners.cli_common import interrupt_exit as _interrupt_exit
from lvzoo.runners.cli_common import parse_assignments as parse_assignments
from lvzoo.runners.cli_common import tracking_uri_option as _tracking_uri_option
from lvzoo.runners.errors import ConfigError, one_line
from lvzoo.runners.sweep_cli import address_option, sweep_command

if TYPE_CHECKING:
    from lvzoo.runners.trainer import Split


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--task", "task_name", metavar="T", help="Registered task name (see `runner list`).")
@click.option("--estimator", "estimator_name", metavar="E", help="Registered estimator name.")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a task or estimator config field (prefix task./estimator. when ambiguous). Repeatable.",
)
@click.option("--epochs", type=int, default=None, help="Epochs to train (default: the task's paper value).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every RNG.")
@_device_option
@_tracking_uri_option
@_data_dir_option
@click.option("--resume", default=None, metavar="RUN", help="Continue a run: its MLflow run id or its run dir.")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where checkpoints go (default: <cwd>/runs/<run id>).",
)
@click.option("--quiet", is_flag=True, help="No progress output (neither bars nor per-epoch lines).")
@click.option("--debug", is_flag=True, help=f"Full tracebacks for expected failures too [env: {DEBUG_ENV}=1].")
@click.pass_context
def main(
    ctx: click.Context,
    task_name: str | None,
    estimator_name: str | None,
    assignments: tuple[str, ...],
    epochs: int | None,
    seed: int,
    device: str,
    tracking_uri: str | None,
    data_dir: Path | None,
    resume: str | None,
    run_dir: Path | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Train TASK with ESTIMATOR and track the run in MLflow (or run a subcommand).

    Progress: tqdm bars on a terminal, one line per epoch otherwise (log files, cluster jobs), none with --quiet or
    under CI=true. Expected failures (bad configuration, data or checkpoint not found or unreadable, unwritable run
    directory or tracking store, a full disk, non-finite training) print one ``Error:`` line and exit 2.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if ctx.invoked_subcommand is not None:
        return
    from lvzoo.runners.trainer import train

    if resume is None and (task_name is None or estimator_name is None):
        raise _OneLineError("--task and --estimator are required (or --resume RUN); see `runner list`")
    try:
        result = train(
            task_name,
            estimator_name,
            overrides=parse_assignments(assignments),
            epochs=epochs,
            seed=seed,
            device=device,
            tracking_uri=tracking_uri,
            data_dir=data_dir,
            resume=resume,
            run_dir=run_dir,
            progress=False if quiet else None,
        )
    except ConfigError as exc:
        raise _OneLineError(str(exc)) from None
    except KeyboardInterrupt as exc:
        click.echo(f"interrupted: {type(exc).__name__}; the run is marked KILLED", err=True)
        sys.exit(_interrupt_exit(exc))
    click.echo(f"run {result.run_id} finished; checkpoint {result.checkpoint}")
    if result.ui_url is not None:
        click.echo(f"MLflow UI: {result.ui_url}", err=True)
    click.echo(json.dumps({f"test_{key}": value for key, value in result.test_metrics.items()}, sort_keys=True))


def _format_default(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str, tuple)):
        return repr(value)
    factory = getattr(value, "factory", None)
    return f"{factory.__name__}()" if callable(factory) else repr(value)


def _config_lines(config_class: type[Any]) -> list[str]:
    from lvzoo.estimators.base import describe_config

    rows = describe_config(config_class)
    if not rows:
        return ["      (no hyper-parameters)"]
    return [f"      {name}: {type_name} = {_format_default(default)}" for name, type_name, default in rows]


@main.command("list")
def list_plugins() -> None:
    """Show registered tasks and estimators with their typed hyper-parameters and defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tasks, task_failures = registry.tasks.load_all()
        estimators, estimator_failures = registry.estimators.load_all()
    lines = ["Tasks:"]
    for name, task_cls in tasks.items():
        lines.append(f"  {name}  (default epochs: {getattr(task_cls, 'default_epochs', '?')})")
        lines.append("    task config:")
        lines.extend(_config_lines(task_cls.config_class))
    if not tasks:
        lines.append("  (none importable)")
    lines.append("Estimators:")
    for name, estimator_cls in estimators.items():
        spaces = ", ".join(space.__name__ for space in estimator_cls.supported_spaces)
        lines.append(f"  {name}  (latent spaces: {spaces})")
        lines.append("    estimator config:")
        lines.extend(_config_lines(estimator_cls.config_class))
    if not estimators:
        lines.append("  (none importable)")
    failures = {
        **{f"task {k}": v for k, v in task_failures.items()},
        **{f"estimator {k}": v for k, v in estimator_failures.items()},
    }
    if failures:
        lines.append("Plugins that failed to import:")
        lines.extend(f"  {what}: {one_line(cause)}" for what, cause in failures.items())
    click.echo("\n".join(lines))


@main.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--final", is_flag=True, help="Use the task's expensive final protocol (e.g. many IS samples).")
@_device_option
@_data_dir_option
def eval_checkpoint(checkpoint: Path, split: Split, final: bool, device: str, data_dir: Path | None) -> None:
    """Evaluate CHECKPOINT (a checkpoint file or run dir) and print its metrics as JSON."""
    from lvzoo.runners.trainer import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(checkpoint, split, final=final, device=device, data_dir=data_dir)
    except ConfigError as exc:
        raise _OneLineError(str(exc)) from None
    click.echo(json.dumps(metrics, sort_keys=True))


@main.command("diagnose")
@click.option("--task", "task_name", required=True, metavar="T", help="Registered task name.")
@click.option("--estimators", required=True, metavar="A,B,...", help="Estimator names to compare.")
@click.option("--checkpoint", default=None, metavar="RUN", help="Model parameters: a run id, run dir or checkpoint.")
@click.option("--batches", type=click.IntRange(min=1), default=2, show_default=True, help="Training batches used.")
@click.option("--draws", type=click.IntRange(min=2), default=100, show_default=True, help="Gradient draws per batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (model init, batches, draws).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Config override. Repeatable.")
@_device_option
@_tracking_uri_option
@_data_dir_option
def diagnose_command(
    task_name: str,
    estimators: str,
    checkpoint: str | None,
    batches: int,
    draws: int,
    seed: int,
    assignments: tuple[str, ...],
    device: str,
    tracking_uri: str | None,
    data_dir: Path | None,
) -> None:
    """Bias and variance of each estimator's score gradient against the exact gradient (or a high-sample unbiased
    reference), at the same parameters and batches; prints a table and tracks it in MLflow."""
    from lvzoo.runners.diagnose import render_table, run_diagnosis

    try:
        report = run_diagnosis(
            task_name,
            [name.strip() for name in estimators.split(",") if name.strip()],
            checkpoint=checkpoint,
            batches=batches,
            draws=draws,
            overrides=parse_assignments(assignments),
            seed=seed,
            device=device,
            data_dir=data_dir,
            tracking_uri=tracking_uri,
            echo=lambda line: click.echo(line, err=True),
        )
    except ConfigError as exc:
        raise _OneLineError(str(exc)) from None
    click.echo(render_table(report), nl=False)
    click.echo(f"run {report.run_id}; table, CSV and plot in {report.run_dir}", err=True)


@main.command("reproduce")
@click.option("--task", "task_name", metavar="T", help="Registered task name.")
@click.option(
    "--estimators",
    default=None,
    metavar="A,B,...",
    help="Estimator names or paper-variant labels (default: the task's paper estimators and variants).",
)
@click.option("--epochs", type=int, default=None, help="Epochs per run (default: the task's paper value).")
@click.option(
    "--seeds",
    "seeds_text",
    default=None,
    metavar="S1,S2,...",
    help="Seeds (default: the paper's: 43..52 for ssvae, 322..331 for signal, 42 for bitvec).",
)
@click.option(
    "--jobs", type=click.IntRange(min=1), default=None, help="Worker processes of --address pool (default: CPU count)."
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a task or estimator config field for every run (e.g. train_limit=500). Repeatable.",
)
@_tracking_uri_option
@_data_dir_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Markdown report path (default: ./reproduce-<reproduce id>.md).",
)
@_device_option
@click.option(
    "--report-only",
    default=None,
    metavar="ID",
    help="Rebuild the report of an earlier reproduction from MLflow (its reproduce id); trains nothing.",
)
@address_option
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True, help="CPUs per run (with --address).")
@click.option("--gpus-per-trial", type=float, default=0.0, show_default=True, help="GPUs per run (with --address).")
def reproduce_command(
    task_name: str | None,
    estimators: str | None,
    epochs: int | None,
    seeds_text: str | None,
    jobs: int | None,
    assignments: tuple[str, ...],
    tracking_uri: str | None,
    data_dir: Path | None,
    out: Path | None,
    device: str,
    report_only: str | None,
    address: str | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> None:
    """Train the task's paper estimator set for every seed, in parallel, and write a markdown results table.

    Exits 1 (after writing the report) when any run failed. With --address (``local``: a local Ray instance) the
    runs are Ray tasks on that cluster instead of a process pool; the report is the same.
    """
    from lvzoo.runners.reproduce_plan import parse_seeds, plan_reproduction
    from lvzoo.runners.reproduce_report import render_report, report_from_mlflow
    from lvzoo.runners.reproduce_run import run_reproduction

    try:
        if report_only is not None:
            report = report_from_mlflow(report_only, tracking_uri, task_name)
        else:
            if task_name is None:
                raise _OneLineError("--task is required (or --report-only ID)")
            plan = plan_reproduction(
                task_name,
                None if estimators is None else [name.strip() for name in estimators.split(",") if name.strip()],
                parse_assignments(assignments),
                epochs=epochs,
                seeds=None if seeds_text is None else parse_seeds(seeds_text),
                device=device,
                data_dir=data_dir.resolve() if data_dir is not None else None,
            )
            if gpus_per_trial > 0 and not device.startswith(("cuda", "auto")):
                raise _OneLineError("--gpus-per-trial needs --device cuda or auto (the runs would ignore their GPUs)")
            report = run_reproduction(
                plan,
                jobs=jobs,
                tracking_uri=tracking_uri,
                echo=lambda line: click.echo(line, err=True),
                address=None if address == "pool" else address or "local",
                cpus_per_run=cpus_per_trial,
                gpus_per_run=gpus_per_trial,
            )
    except ConfigError as exc:
        raise _OneLineError(str(exc)) from None
    except KeyboardInterrupt as exc:
        click.echo(f"interrupted: {type(exc).__name__}; running runs are marked KILLED", err=True)
        sys.exit(_interrupt_exit(exc))
    text = render_report(report)
    path = out if out is not None else Path.cwd() / f"reproduce-{report.reproduce_id}.md"
    path.write_text(text)
    click.echo(text)
    click.echo(f"report written to {path}", err=True)
    if report.failed:
        sys.exit(1)


main.add_command(sweep_command)
