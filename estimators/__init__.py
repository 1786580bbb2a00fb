"""Gradient estimators for discrete and structured latent variables (see :mod:`lvzoo.estimators.base`)."""

from lvzoo.estimators.base import (
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    IncompatibleSpaceError,
    LossFn,
    MarginalizingEstimator,
    SparseDistribution,
    expectation,
    marginalize,
)
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace

__all__ = [
    "BitVector",
    "Categorical",
    "Estimator",
    "EstimatorConfig",
    "EstimatorResult",
    "IncompatibleSpaceError",
    "LatentSpace",
    "LossFn",
    "MarginalizingEstimator",
    "SparseDistribution",
    "expectation",
    "marginalize",
]
