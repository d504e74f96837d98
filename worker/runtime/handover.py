"""Moving training state between the PS tier and worker replicas, for mode switches.

A ps-async job keeps its parameters and torch.optim state on the PS tier, cut
into slices (whole tensors or row ranges, see :mod:`elasticd.placement`); an
allreduce job keeps them in every worker's replica. A switch moves them from
one to the other at a step boundary, unchanged to the bit (:mod:`elasticd.slicing` cuts
state into a placement's slices and joins it again).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from elasticd.slicing import NamedState
from elasticd.wire import as_bytes


@dataclass
class Handover:
    """Training state as one mode leaves it for the next."""

    params: dict[str, torch.Tensor]
    optimizer_state: NamedState
    step: int
    position: int = 0  # next batch index (allreduce data position)
    extra: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """sha256 of every parameter and optimizer-state value, bit for bit."""
        h = hashlib.sha256()
        for name in sorted(self.params):
            h.update(name.encode())
            h.update(as_bytes(self.params[name]))
            for key, value in sorted(self.optimizer_state.get(name, {}).items()):
                h.update(key.encode())
                if isinstance(value, torch.Tensor):
                    h.update(as_bytes(value))
                else:
                    h.update(repr(value).encode())
        return h.hexdigest()


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> NamedState:
    """An optimizer's per-parameter state keyed by parameter name (in ``names`` order)."""
    state = optimizer.state_dict()["state"]
    return {name: dict(state[i]) for i, name in enumerate(names) if i in state}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], named: NamedState
) -> None:
    """Load per-parameter state into ``optimizer``, keeping its own hyperparameters."""
    current = optimizer.state_dict()
    state = {i: dict(named[name]) for i, name in enumerate(names) if name in named}
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
