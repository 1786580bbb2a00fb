"""lvzoo: a gradient-estimator zoo for discrete and structured latent variables.

The public API lives in the subpackages :mod:`lvzoo.estimators`, :mod:`lvzoo.models`, :mod:`lvzoo.tasks`,
:mod:`lvzoo.registry` and :mod:`lvzoo.runners`; this facade re-exports the core types.
"""

from importlib.metadata import PackageNotFoundError, version

from lvzoo.estimators import (
    BitVector,
    Categorical,
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    LatentSpace,
    LossFn,
)

try:
    __version__ = version("lvzoo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BitVector",
    "Categorical",
    "Estimator",
    "EstimatorConfig",
    "EstimatorResult",
    "LatentSpace",
    "LossFn",
    "__version__",
]
