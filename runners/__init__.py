"""lvzoo.runners."""
