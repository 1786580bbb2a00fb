"""lvzoo: a gradient-estimator zoo for discrete and structured latent variables.

The public API lives in the subpackages :mod:`lvzoo.estimators`, :mod:`lvzoo.models`, :mod:`lvzoo.tasks`,
:mod:`lvzoo.registry` and :mod:`lvzoo.runners`; this facade re-exports the core types (lazily).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lvzoo.estimators import (
        BitVector,
        Categorical,
        Estimator,
        EstimatorConfig,
        EstimatorResult,
        LatentSpace,
        LossFn,
    )

#: The re-exported core types, imported on first use (so ``import lvzoo`` does not load torch).
_EXPORTS = {
    "BitVector": "lvzoo.estimators.spaces",
    "Categorical": "lvzoo.estimators.spaces",
    "LatentSpace": "lvzoo.estimators.spaces",
    "Estimator": "lvzoo.estimators.base",
    "EstimatorConfig": "lvzoo.estimators.base",
    "EstimatorResult": "lvzoo.estimators.base",
    "LossFn": "lvzoo.estimators.base",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lvzoo' has no attribute {name!r}")


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
