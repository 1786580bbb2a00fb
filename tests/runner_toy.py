"""A tiny real task and estimator for the runner tests (importable by subprocesses as ``tests.runner_toy``).

The task is a categorical auto-encoder on generated clusters: an encoder scores ``K`` codes for a point
``x [4]``, the decoder maps a one-hot code back to ``R^4`` and the loss is the squared reconstruction error.
Training inputs get fresh Gaussian noise from the global torch RNG each step, so resuming is only exact if
the runner restores the RNG states.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor, nn

from lvzoo.estimators.base import (
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    LossFn,
    SparseDistribution,
    marginalize,
)
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from lvzoo.estimators.validators import positive_number
from lvzoo.tasks.base import BatchObjective, LatentProblem, LatentTerms, PaperSettings, Task, TaskConfig

NUM_CODES = 3
FEATURES = 4
DATA_SEED = 1234


@attrs.frozen
class ToyConfig(TaskConfig):
    """Toy task settings: ``noise`` on training inputs, ``hidden`` widths, ``bits`` for a BitVector latent."""

    noise: float = 0.1
    hidden: tuple[int, ...] = (8,)
    bits: bool = False


class ToyModel(nn.Module):
    """Encoder ``[B, 4] -> scores [B, K]`` (MLP) and linear decoder ``one-hot [R, K] -> [R, 4]``."""

    def __init__(self, hidden: tuple[int, ...]) -> None:
        super().__init__()
        widths = [FEATURES, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.Tanh()]
        self.encoder = nn.Sequential(*layers, nn.Linear(widths[-1], NUM_CODES))
        self.decoder = nn.Linear(NUM_CODES, FEATURES)


def toy_model(model: nn.Module) -> ToyModel:
    assert isinstance(model, ToyModel)
    return model


class ToyTask(Task[ToyConfig]):
    """Categorical auto-encoder on 64 train / 32 val / 32 test generated points."""

    config_class = ToyConfig
    default_epochs = 2
    #: Test hooks (class attributes, so a resumed run does not inherit them through the config).
    interrupt_at_step: ClassVar[int | None] = None
    crash_at_step: ClassVar[int | None] = None
    sigterm_at_step: ClassVar[int | None] = None
    #: Steps (1-based) whose inputs are NaN, so their loss and gradients are not finite.
    nan_at_steps: ClassVar[tuple[int, ...]] = ()
    step_delay: ClassVar[float] = 0.0

    def __init__(self, config: ToyConfig, data_dir: Any, device: torch.device) -> None:
        super().__init__(config, data_dir, device)
        generator = torch.Generator().manual_seed(DATA_SEED)
        centers = 3.0 * torch.randn(NUM_CODES, FEATURES, generator=generator)
        labels = torch.randint(NUM_CODES, (128,), generator=generator)
        points = centers[labels] + 0.3 * torch.randn(128, FEATURES, generator=generator)
        self.splits = {"train": points[:64], "val": points[64:96], "test": points[96:]}
        self.steps_taken = 0

    def latent_space(self) -> LatentSpace:
        return BitVector(NUM_CODES) if self.config.bits else Categorical(NUM_CODES)

    @classmethod
    def paper_settings(cls, estimator: str, config: ToyConfig) -> PaperSettings:
        return PaperSettings(task={"lr": 0.05, "entropy_coef": 0.1, "batch_size": 16})

    def build_model(self) -> nn.Module:
        return ToyModel(self.config.hidden)

    def steps_per_epoch(self) -> int:
        return -(-self.splits["train"].shape[0] // self.config.batch_size)

    def train_batches(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Shuffled batches ``[batch_size, 4]``."""
        batch_size = self.config.batch_size
        data = self.splits["train"]
        order = torch.randperm(data.shape[0], generator=generator)
        for start in range(0, data.shape[0], batch_size):
            yield data[order[start : start + batch_size]].to(self.device)

    def _problem(self, model: nn.Module, x: Tensor) -> LatentProblem:
        toy = toy_model(model)

        def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
            reconstruction: Tensor = toy.decoder(z_rows)
            return (reconstruction - x[example_index]).pow(2).sum(-1)

        return LatentProblem(toy.encoder(x), loss_fn, x)

    def _objective(self, model: nn.Module, estimator: Estimator[Any], x: Tensor) -> EstimatorResult:
        problem = self._problem(model, x)
        return estimator(problem.scores, problem.loss_fn, problem.encoder_input)

    def objective(self, model: nn.Module, batch: Tensor) -> BatchObjective:
        self.steps_taken += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.steps_taken == self.interrupt_at_step:
            raise KeyboardInterrupt
        if self.steps_taken == self.crash_at_step:
            raise RuntimeError("toy crash")
        if self.steps_taken == self.sigterm_at_step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        x = batch + self.config.noise * torch.randn(batch.shape, device=batch.device)
        if self.steps_taken in self.nan_at_steps:
            x = x * float("nan")

        def metrics(terms: LatentTerms) -> dict[str, Tensor]:
            # "loss" as a task may report it: the loop must not count it twice
            return {"loss": terms.loss.detach().mean(), "objective": terms.result.objective.mean()}

        return BatchObjective(self._problem(model, x), result_metrics=metrics)

    def evaluate(
        self, model: nn.Module, estimator: Estimator[Any], split: Literal["val", "test"], final: bool = False
    ) -> dict[str, float]:
        result = self._objective(model, estimator, self.splits[split].to(self.device))
        metrics = {"loss": float(result.objective.mean())}
        if final:
            metrics["final_support"] = float(result.support.double().mean())
        return metrics

    def save_artifacts(self, model: nn.Module, estimator: Estimator[Any], out_dir: Any) -> list[Any]:
        path = out_dir / "decoder_weight.txt"
        path.write_text(repr(toy_model(model).decoder.weight.detach().tolist()))
        return [path]


@attrs.frozen
class TemperedSoftmaxConfig(EstimatorConfig):
    """``temperature`` divides the scores before the softmax."""

    temperature: float = attrs.field(default=1.0, validator=positive_number)


class TemperedSoftmax(Estimator[TemperedSoftmaxConfig]):
    """Exact dense marginalization under ``softmax(scores / temperature)``; logs its temperature."""

    config_class = TemperedSoftmaxConfig
    supported_spaces = (Categorical,)

    def __init__(
        self, space: LatentSpace, config: TemperedSoftmaxConfig | None = None
    ):
        super().__init__(space, config)
        self.calls: Tensor
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """All ``K`` rows of every example of ``scores [B, K]``, weighted by the tempered softmax."""
        self.check_scores(scores)
        batch, num_codes = scores.shape
        self.calls.add_(1)
        probs = torch.softmax(scores / self.config.temperature, dim=-1)
        dist = SparseDistribution(
            z_rows=torch.eye(num_codes, dtype=scores.dtype, device=scores.device).repeat(batch, 1),
            example_index=torch.arange(batch, device=scores.device).repeat_interleave(num_codes),
            probs=probs.reshape(-1),
            num_examples=batch,
        )
        temperature = torch.tensor(self.config.temperature, device=scores.device)
        return marginalize(dist, loss_fn, logs={"temperature": temperature})


def run_in_subprocess(store_uri: str, run_dir: str, epochs: int, delay: float) -> None:
    """Entry for the SIGKILL test: train slowly so the parent can kill the process mid-run."""
    from lvzoo.runners import train

    ToyTask.step_delay = delay
    train(ToyTask, TemperedSoftmax, epochs=epochs, seed=3, tracking_uri=store_uri, run_dir=run_dir, progress=False)
