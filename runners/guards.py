"""The non-finite guard of the training loop: a step whose loss or gradients are not finite stops the run with one
line naming the epoch, the step and the first non-finite quantity, or, within ``skip_nonfinite_steps``, is skipped.

The check costs one device-to-host transfer per step (one flag for the loss and every gradient together); the
names of the culprits are only looked up on the failure path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lvzoo.runners.plan import ConfigError


class NonFiniteError(ConfigError):
    """A training step produced a non-finite loss or gradient (the message is one line)."""


class NonFiniteStepWarning(UserWarning):
    """A non-finite step was skipped (``skip_nonfinite_steps``); the CLI prints it as one line."""


def _first_non_finite(loss: Tensor, metrics: Mapping[str, Tensor], named: Iterable[tuple[str, nn.Parameter]]) -> str:
    """What went non-finite first: a loss term, else the loss, else the first parameter with a bad gradient."""
    for key, value in metrics.items():
        if not bool(torch.isfinite(value).all()):
            return f"loss term {key!r} = {float(value.float().mean())}"
    if not bool(torch.isfinite(loss).all()):
        return f"loss = {float(loss)}"
    for name, param in named:
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return f"gradient of {name!r}"
    return "an unknown quantity"


class NonFiniteGuard:
    """Checks each step of ``modules`` (named ``model.`` / ``estimator.`` in messages); allows ``skips`` skipped
    steps in the whole run (``skipped`` counts them, across resumes when restored)."""

    def __init__(self, modules: Mapping[str, nn.Module], skips: int, skipped: int = 0) -> None:
        self.modules = modules
        self.skips = skips
        self.skipped = skipped

    def _named(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{prefix}.{name}", param)
            for prefix, module in self.modules.items()
            for name, param in module.named_parameters()
        ]

    def skip_step(self, loss: Tensor, metrics: Mapping[str, Tensor], epoch: int, step: int) -> bool:
        """After backward: ``False`` when the loss and every gradient are finite; ``True`` when the step must be
        skipped (its gradients are cleared); raises :class:`NonFiniteError` once the allowance is used up."""
        grads = [p.grad for _, p in self._named() if p.grad is not None]
        values = [loss.detach().reshape(1).float()]
        if grads:
            values.append(torch.stack(torch._foreach_norm(grads)).float())
        if bool(torch.isfinite(torch.cat([value.to(loss.device) for value in values])).all()):
            return False
        culprit = _first_non_finite(loss.detach(), metrics, self._named())
        where = f"epoch {epoch + 1}, step {step + 1}"
        if self.skipped >= self.skips:
            allowance = f"after {self.skipped} skipped step(s); " if self.skips else ""
            raise NonFiniteError(
                f"non-finite training step at {where}: {culprit} ({allowance}the last good checkpoint is kept; lower "
                f"the learning rate, or allow skipping with --set skip_nonfinite_steps=N)"
            )
        self.skipped += 1
        for _, param in self._named():
            param.grad = None
        warnings.warn(
            f"skipped non-finite step at {where}: {culprit} ({self.skipped}/{self.skips} allowed)",
            NonFiniteStepWarning,
            stacklevel=2,
        )
        return True
