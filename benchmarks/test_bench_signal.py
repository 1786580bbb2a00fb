"""The signalling game's training step with the lean receiver against the per-row-copy receiver it replaced.

Cases, for the default 4,096-d features and the 784-d pixels: sparsemax at full support (the sender's temperature
raised until every symbol is in the support, as at the paper's init) and at a mean support of about 5 (the
temperature lowered until it is), softmax (256 rows per game) and Gumbel (one relaxed row per game),
each with the ``lean`` receiver (:class:`~lvzoo.models.signal.GameLoss`) and the ``copies`` one
(:class:`tests.signal_reference.PerRowCopyLoss`). Groups are ``signal-<features>-<estimator>-<regime>-<size>``, so
pytest-benchmark's table puts the two receivers of a case side by side; ``extra_info`` holds the mean support.
The step-to-(sender + receiver) ratio is measured by ``python -m benchmarks.overhead --task signal``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from entmax import sparsemax

from lvzoo.models.signal import GameLoss, GameLossKind, SignalGameModel
from tests.signal_reference import PerRowCopyLoss

from .common import TaskSetup, build_task_setup, timed, train_step_fn

SIZES: dict[str, dict[str, Any]] = {
    "fast": {"train_limit": 64, "eval_limit": 16, "batch_size": 16},
    "full": {"train_limit": 64, "eval_limit": 16},
}
CASES = [("sparsemax", "full"), ("sparsemax", "support5"), ("softmax", "full"), ("gumbel", "one")]
#: The default 4,096-d features and the 784-d pixels (where the receiver is a larger share of the step).
FEATURES = ["mnist-fashion-relu", "mnist-fashion"]
TARGET_SUPPORT = 5.0


def _use_copies(model: SignalGameModel) -> None:
    """Make ``model`` build :class:`PerRowCopyLoss` instead of the lean :class:`GameLoss`."""

    def game_loss(candidate_embeddings: torch.Tensor, target: torch.Tensor, kind: GameLossKind = "nll") -> GameLoss:
        return PerRowCopyLoss(model.receiver, candidate_embeddings, target, kind)

    model.game_loss = game_loss  # type: ignore[method-assign]


def _tune_temperature_to_support(setup: TaskSetup, target: float) -> float:
    """Scale the sender's temperature until sparsemax's mean support on the batch reaches ``target`` (lowered for a
    small target, raised for the full vocabulary); returns the mean support."""
    model = setup.model
    assert isinstance(model, SignalGameModel)
    factor = 0.9 if target < model.vocab_size else 2.0
    with torch.no_grad():
        features = setup.batch.target_features()
        while True:
            support = float((sparsemax(model(features), dim=-1) > 0).sum(-1).float().mean())
            if (support <= target) if factor < 1 else (support >= target):
                return support
            model.sender.temperature *= factor


@pytest.mark.parametrize("receiver", ["lean", "copies"])
@pytest.mark.parametrize(("estimator_name", "regime"), CASES, ids=[f"{e}-{r}" for e, r in CASES])
@pytest.mark.parametrize("features", FEATURES)
def test_signal_step(
    benchmark: Any,
    device: torch.device,
    data_dir: Path | None,
    bench_size: str,
    features: str,
    estimator_name: str,
    regime: str,
    receiver: str,
) -> None:
    overrides = {**SIZES[bench_size], "features": features}
    setup = build_task_setup("signal", estimator_name, overrides, device, data_dir)
    model = setup.model
    assert isinstance(model, SignalGameModel)
    support = None
    if estimator_name == "sparsemax":
        support = _tune_temperature_to_support(setup, TARGET_SUPPORT if regime == "support5" else model.vocab_size)
    if receiver == "copies":
        _use_copies(model)
    benchmark.group = f"signal-{features}-{estimator_name}-{regime}-{bench_size}"
    loss = benchmark(timed(train_step_fn(setup), device))
    benchmark.extra_info["mean_support"] = support
    assert bool(torch.isfinite(loss))
    if regime == "support5":
        assert support is not None and 1.0 <= support <= TARGET_SUPPORT
    elif support is not None:
        assert support == model.vocab_size
