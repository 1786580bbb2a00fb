"""lvzoo.runners: the generic training loop, its CLI (``runner``), checkpoints and MLflow tracking.

Modules: ``cli`` (``runner``), ``plan`` (``--set`` overrides and configs, names -> classes,
:class:`~lvzoo.runners.plan.RunPlan` and its one serialization), ``trainer`` (:func:`train`, the loop and its hook
points, :func:`evaluate_checkpoint`), ``callbacks`` (tracking, checkpoints, progress, plots), ``resume`` (finding and
re-planning a checkpoint), ``checkpoint``, ``process``, ``plots`` and ``runner reproduce`` (``reproduce_plan``,
``reproduce_run``, ``reproduce_report``).
"""

from lvzoo.runners.callbacks import MlflowTracker, Tracker, default_tracking_uri
from lvzoo.runners.plan import ConfigError
from lvzoo.runners.process import TerminatedError
from lvzoo.runners.trainer import TrainResult, evaluate_checkpoint, train

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
