"""The runner tests' toy task with knobs that reach Ray workers through the config (``tests.sweep_toy``).

``delay`` sleeps that many seconds every training step (slow trials to interrupt); ``kill_file`` and
``kill_at_step`` SIGKILL the worker process at that training step of the process, once: the first process to
create ``kill_file`` (it holds the pid) dies, later ones (e.g. Ray's retry) train on.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import attrs
from torch import nn

from lvzoo.tasks.base import BatchObjective
from tests.runner_toy import ToyConfig, ToyTask


@attrs.frozen
class SweepToyConfig(ToyConfig):
    delay: float = 0.0
    kill_file: str = ""
    kill_at_step: int = 0


class SweepToyTask(ToyTask):
    config_class = SweepToyConfig

    def objective(self, model: nn.Module, batch: Any) -> BatchObjective:
        config = self.config
        assert isinstance(config, SweepToyConfig)
        if config.delay:
            time.sleep(config.delay)
        if config.kill_file and self.steps_taken + 1 == config.kill_at_step:
            try:
                handle = os.open(config.kill_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(handle, str(os.getpid()).encode())
                os.close(handle)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().objective(model, batch)
