"""lvzoo.tasks."""
