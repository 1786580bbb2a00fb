"""lvzoo.runners: the generic training loop, its CLI (``runner``), checkpoints and MLflow tracking."""

from lvzoo.runners.config import ConfigError
from lvzoo.runners.loop import TerminatedError, TrainResult, evaluate_checkpoint, train
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
