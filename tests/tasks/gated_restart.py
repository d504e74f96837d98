"""Test task: linear regression whose restarted processes wait at a gate.

With a ``gate``, a process the agent started again
(``ELASTICD_RESTART_COUNT`` above 0) builds its model only once that file
exists, so a test holds a replacement in its start-up for as long as it likes. ``step_delay_s`` slows
every step, so a job of a few thousand steps outlasts the test's waits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from elasticd.task import import_task_module

_linreg = import_task_module(str(Path(__file__).resolve().parents[2] / "examples" / "linreg.py"))


class GatedTask(_linreg.LinRegTask):
    def __init__(self, batch_size: int, seed: int, gate: str, step_delay_s: float) -> None:
        super().__init__(batch_size, seed, in_features=8, noise=0.01)
        self.gate = Path(gate) if gate else None
        self.step_delay_s = step_delay_s

    def build_model(self) -> nn.Module:
        if self.gate is not None and int(os.environ.get("ELASTICD_RESTART_COUNT", "0")) > 0:
            while not self.gate.exists():
                time.sleep(0.05)
        return super().build_model()

    def loss(self, model, batch):
        time.sleep(self.step_delay_s)
        return super().loss(model, batch)


def make_task(batch_size: int, seed: int, gate: str = "", step_delay_s: float = 0.0) -> GatedTask:
    return GatedTask(batch_size, seed, gate, step_delay_s)
