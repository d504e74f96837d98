"""Test task: linear regression whose restarted processes wait at a gate.

With a ``gate``, a process the agent started again
(``ELASTICD_RESTART_COUNT`` above 0) builds its model only once that file
exists, so a test holds a replacement in its start-up for as long as it likes.
With a ``slow`` file, a process never restarted takes ``slow_step_s`` a step
while the file exists, so a test keeps a survivor from finishing the job before
its replacement is back (still stepping and reporting: a survivor that went
silent would look to the controller like a cluster coming back from a stop). ``step_delay_s`` slows every step, so a job of a few
thousand steps outlasts the test's waits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from elasticd.task import import_task_module
from elasticd.worker.runtime import heartbeat

_linreg = import_task_module(str(Path(__file__).resolve().parents[2] / "examples" / "linreg.py"))


def _restarted() -> bool:
    return int(os.environ.get("ELASTICD_RESTART_COUNT", "0")) > 0


def _wait_for(path: Path) -> None:
    while not path.exists():
        heartbeat.beat()
        time.sleep(0.05)


class GatedTask(_linreg.LinRegTask):
    def __init__(
        self,
        batch_size: int,
        seed: int,
        gate: str,
        step_delay_s: float,
        slow: str,
        slow_step_s: float,
    ) -> None:
        super().__init__(batch_size, seed, in_features=8, noise=0.01)
        self.gate = Path(gate) if gate else None
        self.slow = Path(slow) if slow and not _restarted() else None
        self.slow_step_s = slow_step_s
        self.step_delay_s = step_delay_s

    def build_model(self) -> nn.Module:
        if self.gate is not None and _restarted():
            _wait_for(self.gate)
        return super().build_model()

    def loss(self, model, batch):
        slow = self.slow is not None and self.slow.exists()
        time.sleep(self.slow_step_s if slow else self.step_delay_s)
        return super().loss(model, batch)


def make_task(
    batch_size: int,
    seed: int,
    gate: str = "",
    step_delay_s: float = 0.0,
    slow: str = "",
    slow_step_s: float = 0.2,
) -> GatedTask:
    return GatedTask(batch_size, seed, gate, step_delay_s, slow, slow_step_s)
