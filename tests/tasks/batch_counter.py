"""Test task whose parameters count how often each batch index was applied.

The model holds two vectors, ``a`` and ``b``, of ``batches`` zeros. The loss
of batch ``i`` is ``a[i % batches] + b[i % batches]``, so its gradient is 1 at
that slot and 0 elsewhere, whatever the parameters. Trained with plain SGD
at lr 1, each application of batch ``i`` takes exactly 1 off both slots: in
the final parameters, -1 at a slot means its batch was applied once, 0 that
it was lost and -2 that it was applied twice. Two vectors, so that two PS
hold one each and a batch can be applied on one shard and not the other.
``step_delay_s`` slows every batch, so a short job outlasts a test's faults;
while the file ``slow`` exists a batch takes ``slow_step_s`` instead, so a
test keeps a job going for as long as a fault lasts and then lets it finish.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


class Counters(nn.Module):
    def __init__(self, batches: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(batches))
        self.b = nn.Parameter(torch.zeros(batches))


class BatchCounterTask:
    def __init__(self, batches: int, step_delay_s: float, slow: str, slow_step_s: float) -> None:
        self.batches = batches
        self.step_delay_s = step_delay_s
        self.slow = Path(slow) if slow else None
        self.slow_step_s = slow_step_s

    def build_model(self) -> nn.Module:
        return Counters(self.batches)

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        slow = self.slow is not None and self.slow.exists()
        time.sleep(self.slow_step_s if slow else self.step_delay_s)
        return (torch.tensor([index % self.batches]),)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (slot,) = batch
        return model.a[slot].sum() + model.b[slot].sum()


def make_task(
    batch_size: int,
    seed: int,
    batches: int = 100,
    step_delay_s: float = 0.0,
    slow: str = "",
    slow_step_s: float = 0.1,
) -> BatchCounterTask:
    return BatchCounterTask(batches, step_delay_s, slow, slow_step_s)
