"""``runner diagnose``: every named estimator's gradient w.r.t. the encoder scores, at the same model parameters and on
the same batches, against a reference (:mod:`lvzoo.estimators.diagnostics`); a printed table, tracked in MLflow
(metrics ``<estimator>.<statistic>``, the table as markdown and CSV, a plot).

The same statistics are reported for the gradient w.r.t. the encoder's parameters (``encoder_*``: each score
gradient carried through the encoder, ``J^T g``). The model is a checkpoint's (``--checkpoint``) or a fresh one
under ``--seed``; the task config is the checkpoint's, else the first estimator's resolved one. Each estimator is
built fresh from its resolved config (paper settings, then ``--set``) and used in eval mode: stateful baselines
start from their initial state (a moving average at 0), relaxations at their initial temperature. Statistics are
averaged over the batches.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

from lvzoo.estimators.base import MarginalizingEstimator
from lvzoo.estimators.diagnostics import (
    Diagnosis,
    Gradients,
    diagnose,
    reference_gradient,
    statistics,
    through_encoder,
)
from lvzoo.runners import checkpoint as ckpt
from lvzoo.runners.callbacks import Callback, MlflowTracker, Tracker
from lvzoo.runners.errors import ConfigError, one_line
from lvzoo.runners.plan import plan_run
from lvzoo.runners.resume import find_checkpoint, plan_from_checkpoint
from lvzoo.runners.trainer import seed_everything

if TYPE_CHECKING:
    from lvzoo.runners.trainer import Trainer

#: Draws per diagnosis during training (``diagnose_every``).
TRAINING_DRAWS = 20
COLUMNS = {
    "bias_norm": "bias",
    "relative_bias": "rel. bias",
    "bias_z": "bias / SE",
    "variance": "variance",
    "cosine_single": "cos (1 draw)",
    "cosine_mean": "cos (mean)",
    "snr": "SNR",
    "rows_per_example": "rows/example",
    "ms_per_draw": "ms/draw",
    "encoder_bias_z": "encoder bias / SE",
    "encoder_variance": "encoder variance",
    "encoder_cosine_mean": "encoder cos (mean)",
}


@attrs.frozen
class DiagnoseReport:
    """Per estimator name: its averaged statistics and the reference kind; where the run's files are."""

    rows: Mapping[str, Mapping[str, float]]
    references: Mapping[str, str]
    run_id: str
    run_dir: Path


def _average(diagnoses: Sequence[Diagnosis]) -> dict[str, float]:
    metrics = [d.metrics() for d in diagnoses]
    return {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}


def _through_encoder(diagnosis: Diagnosis, raw: Gradients, scores: Tensor, parameters: Sequence[Tensor]) -> Diagnosis:
    """The same statistics for the gradient w.r.t. the encoder parameters (the score gradients carried by ``J^T``)."""
    carry = partial(through_encoder, scores, parameters)
    reference_draws = None if raw.reference_draws is None else carry(raw.reference_draws)
    return statistics(
        diagnosis.reference,
        carry(raw.draws),
        carry(raw.reference.unsqueeze(0))[0],
        reference_draws,
        diagnosis.rows_per_example,
        diagnosis.ms_per_draw,
    )


def render_table(report: DiagnoseReport) -> str:
    """The markdown table of :class:`DiagnoseReport`."""
    header = ["estimator", "reference", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in report.rows.items():
        cells = [name, report.references[name], *(f"{row[key]:.4g}" for key in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(report: DiagnoseReport, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report.rows)
    figure = Figure(figsize=(max(5.0, 0.9 * len(names) + 2), 3.5), dpi=100)
    FigureCanvasAgg(figure)
    for position, (key, label) in enumerate((("variance", "variance (tr Var g)"), ("bias_z", "bias / SE")), 1):
        axes = figure.add_subplot(1, 2, position)
        axes.bar(names, [max(report.rows[name][key], 1e-12) for name in names])
        axes.set_yscale("log")
        axes.set_title(label, fontsize="small")
        axes.tick_params(axis="x", labelrotation=45, labelsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path


def _metric_name(estimator: str, key: str) -> str:
    """MLflow metric names allow letters, digits and ``_-./ ``: ``sfe+`` becomes ``sfe_plus``."""
    return f"{estimator.replace('+', '_plus')}.{key}"


def run_diagnosis(
    task: str,
    estimators: Sequence[str],
    *,
    checkpoint: str | Path | None = None,
    batches: int = 2,
    draws: int = 100,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    data_dir: Path | None = None,
    tracking_uri: str | None = None,
    echo: Callable[[str], None] = print,
) -> DiagnoseReport:
    """Diagnose ``estimators`` on ``batches`` training batches of ``task`` with ``draws`` draws each."""
    if not estimators:
        raise ConfigError("--estimators needs at least one estimator name")
    if batches < 1 or draws < 2:
        raise ConfigError(f"--batches must be >= 1 and --draws >= 2, got {batches} and {draws}")
    plans = {name: plan_run(task, name, overrides or {}, epochs=1, seed=seed, device=device, data_dir=data_dir)
             for name in estimators}
    base = next(iter(plans.values()))
    state: dict[str, Any] | None = None
    if checkpoint is not None:
        path, _ = find_checkpoint(checkpoint, None, tracking_uri)
        state = ckpt.load_checkpoint(path)[0]
        base = plan_from_checkpoint(state, task, None, epochs=None, device=device, data_dir=data_dir)
    shuffle = seed_everything(seed)
    problem = base.task_cls(base.task_config, base.data_dir, base.device)
    model = problem.build_model().to(base.device)
    if state is not None:
        model.load_state_dict(state["model"])
    model.eval()
    parameters = [param for param in model.parameters() if param.requires_grad]
    latents = []
    for batch in problem.train_batches(shuffle):
        latent = problem.objective(model, batch).latent
        if latent is not None:
            latents.append(latent)
        if len(latents) == batches:
            break
    rows: dict[str, dict[str, float]] = {}
    references: dict[str, str] = {}
    built = {}
    for name, plan in plans.items():  # every pair is checked before anything is measured
        try:
            built[name] = plan.estimator_cls(problem.latent_space(), plan.estimator_config).to(base.device).eval()
        except ValueError as exc:
            raise ConfigError(f"task {base.task_name!r} cannot use estimator {name!r}: {one_line(str(exc))}") from None
    shared: dict[int, Any] = {}  # one reference per batch, computed for the first sampling estimator
    for name, estimator in built.items():
        diagnoses, encoder = [], []
        for position, lat in enumerate(latents):
            scores = lat.scores.detach()
            if position not in shared and not isinstance(estimator, MarginalizingEstimator):
                shared[position] = reference_gradient(estimator.space, scores, lat.loss_fn)
            diagnosis, raw = diagnose(
                estimator, scores, lat.loss_fn, lat.encoder_input, draws=draws, reference=shared.get(position)
            )
            diagnoses.append(diagnosis)
            encoder.append(_through_encoder(diagnosis, raw, lat.scores, parameters))
        rows[name] = {**_average(diagnoses), **{f"encoder_{k}": v for k, v in _average(encoder).items()}}
        references[name] = diagnoses[0].reference
        echo(f"{name}: bias/SE {rows[name]['bias_z']:.3g}, variance {rows[name]['variance']:.4g}")
    tracker = MlflowTracker(tracking_uri)
    tracker.start(f"{base.task_name}-diagnose", "diagnose", {"task": base.task_name, "kind": "diagnose"})
    tracker.log_params({"estimators": ",".join(estimators), "batches": str(batches), "draws": str(draws),
                        "checkpoint": str(checkpoint), "seed": str(seed), **base.to_params()})
    tracker.log_metrics({_metric_name(n, k): v for n, row in rows.items() for k, v in row.items()}, step=0)
    run_dir = (Path.cwd() / "runs" / tracker.run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    report = DiagnoseReport(rows=rows, references=references, run_id=tracker.run_id, run_dir=run_dir)
    (run_dir / "diagnose.md").write_text(render_table(report))
    with open(run_dir / "diagnose.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["estimator", "reference", *COLUMNS])
        writer.writerows([name, references[name], *(row[key] for key in COLUMNS)] for name, row in rows.items())
    for artifact in ("diagnose.md", "diagnose.csv"):
        tracker.log_artifact(run_dir / artifact)
    tracker.log_artifact(_plot(report, run_dir / "diagnose.png"))
    tracker.end("FINISHED")
    return report


class DiagnoseCallback(Callback):
    """``--set diagnose_every=N``: every ``N`` training steps, the diagnostics of the run's own estimator on one fixed
    training batch (:data:`TRAINING_DRAWS` draws, eval mode), logged as ``diagnose_<statistic>`` at the global step,
    so the bias and variance show next to the loss curves. The random state is restored afterwards, so a run with
    diagnostics trains exactly as one without."""

    def __init__(self, every: int, tracker: Tracker, draws: int = TRAINING_DRAWS) -> None:
        self.every, self.tracker, self.draws = every, tracker, draws
        self.batch: Any = None

    def on_train_begin(self, trainer: Trainer) -> None:
        super().on_train_begin(trainer)
        with torch.random.fork_rng(devices=[]):
            self.batch = next(iter(trainer.components.task.train_batches(torch.Generator().manual_seed(0))))

    def on_batch_end(self, batch: int, loss: Tensor, support: Tensor) -> None:
        step = self.trainer.state.global_step + batch + 1
        if step % self.every:
            return
        components = self.trainer.components
        device = components.task.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            training = components.model.training, components.estimator.training
            components.model.eval()
            components.estimator.eval()
            try:
                latent = components.task.objective(components.model, self.batch).latent
                if latent is None:
                    return
                diagnosis, _ = diagnose(
                    components.estimator, latent.scores.detach(), latent.loss_fn, latent.encoder_input, draws=self.draws
                )
            finally:
                components.model.train(training[0])
                components.estimator.train(training[1])
        self.tracker.log_metrics({f"diagnose_{key}": value for key, value in diagnosis.metrics().items()}, step=step)
