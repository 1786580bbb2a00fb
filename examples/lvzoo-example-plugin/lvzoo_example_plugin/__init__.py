"""An example third-party lvzoo plugin: the ``batchloo`` estimator, registered through an entry point."""

from lvzoo_example_plugin.batch_loo import BatchLOO, BatchLOOConfig

__all__ = ["BatchLOO", "BatchLOOConfig"]
