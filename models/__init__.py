"""lvzoo.models."""
