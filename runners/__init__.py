"""lvzoo.runners: the generic training loop, its CLI (``runner``), checkpoints and MLflow tracking.

Modules: ``cli`` (``runner``), ``plan`` (``--set`` overrides and configs, names -> classes,
:class:`~lvzoo.runners.plan.RunPlan` and its one serialization), ``trainer`` (:func:`train`, the loop and its hook
points, :func:`evaluate_checkpoint`), ``callbacks`` (tracking, checkpoints, progress, plots), ``resume`` (finding and
re-planning a checkpoint), ``checkpoint``, ``process``, ``plots`` and ``runner reproduce`` (``reproduce_plan``,
``reproduce_run``, ``reproduce_report``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lvzoo.runners.callbacks import MlflowTracker, Tracker
    from lvzoo.runners.errors import ConfigError
    from lvzoo.runners.process import TerminatedError, default_tracking_uri
    from lvzoo.runners.trainer import TrainResult, evaluate_checkpoint, train

#: Public name -> the module defining it; imported on first use, so ``import lvzoo.runners`` (and ``runner --help``)
#: stays free of torch and MLflow.
_EXPORTS = {
    "ConfigError": "lvzoo.runners.errors",
    "MlflowTracker": "lvzoo.runners.callbacks",
    "TerminatedError": "lvzoo.runners.process",
    "Tracker": "lvzoo.runners.callbacks",
    "TrainResult": "lvzoo.runners.trainer",
    "default_tracking_uri": "lvzoo.runners.process",
    "evaluate_checkpoint": "lvzoo.runners.trainer",
    "train": "lvzoo.runners.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lvzoo.runners' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "MlflowTracker",
    "TerminatedError",
    "Tracker",
    "TrainResult",
    "default_tracking_uri",
    "evaluate_checkpoint",
    "train",
]
