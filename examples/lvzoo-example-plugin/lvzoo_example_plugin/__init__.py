"""An example third-party lvzoo plugin: the ``rloo`` estimator, registered through an entry point."""

from lvzoo_example_plugin.rloo import RLOO, RLOOConfig

__all__ = ["RLOO", "RLOOConfig"]
