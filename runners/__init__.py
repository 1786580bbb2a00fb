"""lvzoo.runners: the generic training loop, its CLI (``runner``), checkpoints and MLflow tracking.

Modules: ``plan`` (names -> classes, :class:`~lvzoo.runners.plan.RunPlan` and its one serialization),
``trainer`` (the loop and its hook points), ``callbacks`` (tracking, checkpoints, progress, plots), ``run``
(:func:`train`, :func:`evaluate_checkpoint`), ``reproduce`` (``runner reproduce``: ``reproduce_plan``,
``reproduce_run``, ``reproduce_report``), ``config``, ``checkpoint``, ``tracking``, ``process``, ``plots``, ``cli``.
"""

from lvzoo.runners.config import ConfigError
from lvzoo.runners.process import TerminatedError
from lvzoo.runners.run import TrainResult, evaluate_checkpoint, train
from lvzoo.runners.tracking import MlflowTracker, Tracker, default_tracking_uri

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
