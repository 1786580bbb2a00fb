"""Plots logged as MLflow artifacts: decoder calls per example over training, as the paper's figures show them, and
the callback that logs it at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lvzoo.runners.callbacks import Callback, Tracker

#: Per-epoch statistics of the decoder calls per example that the plot draws (keys of each epoch's mapping).
SUPPORT_STATISTICS = ("support_p10", "support_median", "support_p90", "support_mean")


def plot_decoder_calls(epochs: Sequence[Mapping[str, float]], path: Path) -> Path:
    """PNG of the decoder calls per example over epochs: the median, a 10th-90th percentile band and the mean.

    ``epochs``: one mapping per epoch with the keys of :data:`SUPPORT_STATISTICS`. Matplotlib's Agg canvas is used
    directly (no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    x = list(range(1, len(epochs) + 1))
    low, median, high, mean = ([epoch[key] for epoch in epochs] for key in SUPPORT_STATISTICS)
    axes.fill_between(x, low, high, alpha=0.3, step=None, label="10th-90th percentile")
    axes.plot(x, median, marker="o", markersize=3, label="median")
    axes.plot(x, mean, linestyle="--", label="mean")
    axes.set_xlabel("epoch")
    axes.set_ylabel("decoder calls per example")
    axes.set_ylim(bottom=0)
    axes.set_title("Decoder calls per example (training)")
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path


class DecoderCallsPlotCallback(Callback):
    """At the end, plots the decoder calls per example of every epoch to ``path`` and logs it under ``plots``."""

    def __init__(self, path: Path, tracker: Tracker) -> None:
        self.path, self.tracker = path, tracker

    def on_train_end(self, metrics: Mapping[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker.log_artifact(plot_decoder_calls(self.trainer.state.support_per_epoch, self.path), "plots")
