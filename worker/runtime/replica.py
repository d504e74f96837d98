"""A full replica of the model and its optimizer, and how replicas agree after a change.

Every all-reduce worker holds the whole model, the whole optimizer state,
the global step (updates applied) and the data position (the first batch
index no step has used yet). While a group trains, all replicas apply the
same averaged gradient and stay bitwise equal.

When a group forms (a new generation, or a new round after a failure), the
replicas first agree on a source: every rank contributes ``(has_state,
step)``; the source is the rank that has state with the highest step, the
lowest rank on ties (:func:`choose_source`). A process just started has no
state; a survivor does. The source then broadcasts its parameters, buffers,
optimizer state (tensors, plus a JSON header with the step counters and other
plain values) and its step, data position and learning-rate ramp. State
comes from a surviving replica, in memory: no round trip to object storage
while any replica lives (ARCHITECTURE invariant 5). Nothing is unpickled: the
header is JSON, tensors travel as raw buffers whose dtypes and shapes the
receiver already knows or reads from the header (invariant 7).

Learning rate follows the linear scaling rule (Goyal et al., 2017): with
``batch_size`` samples per worker, the global batch grows with the world
size, so ``lr = base_lr * world_size / reference`` where ``reference`` is
``workers.max`` — the spec's ``lr`` is the rate for the full-size job, and a
job running short of workers trains with a proportionally smaller rate. An
optional warm-up ramps the rate linearly over ``warmup_steps`` steps when a
change *raises* it (the world grew); a drop applies at once, since a smaller
batch at the old, larger rate is the riskier side.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from elasticd.jobspec import JobSpec
from elasticd.optimizers import build_optimizer
from elasticd.task import Task
from elasticd.wire import DTYPES, dtype_name
from elasticd.worker.runtime.handover import Handover
from elasticd.worker.runtime.process_group import ElasticGroup
from elasticd.worker.runtime.switching import from_model, into_model

log = logging.getLogger(__name__)


def choose_source(table: list[tuple[int, int]]) -> int:
    """The rank to copy state from: has state, highest step, lowest rank on ties.

    ``table[rank] = (has_state, step)``. With no state anywhere, rank 0
    (all replicas were built from the same seed, so any would do).
    """
    best = 0
    for rank, (has, step) in enumerate(table):
        if (has, step) > tuple(table[best]):
            best = rank
    return best


@dataclass(frozen=True)
class Ramp:
    """A learning-rate warm-up: from ``from_lr`` at ``start_step`` to the target."""

    start_step: int
    from_lr: float


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    reference_world: int
    scale: bool = True
    warmup_steps: int = 0

    def target(self, world: int) -> float:
        if not self.scale:
            return self.base_lr
        return self.base_lr * world / self.reference_world

    def at(self, step: int, world: int, ramp: Ramp | None) -> float:
        """The rate for the update that takes the replica from ``step`` to ``step + 1``."""
        target = self.target(world)
        if ramp is None or self.warmup_steps <= 0 or step >= ramp.start_step + self.warmup_steps:
            return target
        frac = (step - ramp.start_step + 1) / self.warmup_steps
        return ramp.from_lr + (target - ramp.from_lr) * frac

    def after_change(
        self, step: int, old_world: int, new_world: int, ramp: Ramp | None
    ) -> Ramp | None:
        """The ramp to follow once the world changed from ``old_world`` (0: fresh start)."""
        if old_world in (0, new_world):
            return ramp
        current = self.at(step, old_world, ramp)
        if self.warmup_steps <= 0 or self.target(new_world) <= current:
            return None
        return Ramp(step, current)


class Replica:
    def __init__(self, task: Task, spec: JobSpec, device: torch.device, schedule: LRSchedule):
        self.task = task
        self.device = device
        self.model = task.build_model().to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(spec.optimizer.name, spec.optimizer.kwargs, self.params)
        self.schedule = schedule
        self.step = 0  # updates applied
        self.position = 0  # first batch index not used yet
        self.world = 0  # world size of the group that produced this state (0: none yet)
        self.ramp: Ramp | None = None
        self.has_state = False

    @staticmethod
    def base_lr(spec: JobSpec) -> float:
        """The spec's lr, or the optimizer's default when the spec names none."""
        if "lr" in spec.optimizer.kwargs:
            return float(spec.optimizer.kwargs["lr"])
        probe = build_optimizer(spec.optimizer.name, spec.optimizer.kwargs, [torch.zeros(1)])
        return float(probe.defaults["lr"])

    def lr(self, world: int) -> float:
        return self.schedule.at(self.step, world, self.ramp)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- agreeing on state ---------------------------------------------------------

    def sync(
        self, group: ElasticGroup, restore: Callable[[], Handover | None] | None = None
    ) -> int:
        """Make every replica of ``group`` equal to the chosen source; returns its rank.

        When no replica holds state, the source first takes it from ``restore()``
        (a checkpoint), if that gives any.
        """
        table = torch.zeros(group.world_size, 2, dtype=torch.int64, device=self.device)
        table[group.rank, 0] = int(self.has_state)
        table[group.rank, 1] = self.step
        group.all_reduce(table)
        rows = [(int(h), int(s)) for h, s in table.tolist()]
        source = choose_source(rows)
        if restore is not None and not any(h for h, _ in rows) and group.rank == source:
            state = restore()
            if state is not None:
                into_model(state, self.model, self.optimizer)
                self.step, self.position, self.world = state.step, state.position, 0
                held = from_model(self.model, self.optimizer, self.step, self.position)
                log.info(
                    "event=replica_restored step=%d position=%d digest=%s",
                    self.step,
                    self.position,
                    held.digest(),
                )
        if group.world_size > 1:
            header = self._header() if group.rank == source else None
            header = _broadcast_json(group, header, source, self.device)
            if group.rank != source and self.step != header["step"]:
                # Overwritten from here on: if the broadcast breaks half-way, this
                # replica must not pass for a source in the next round.
                self.has_state = False
            tensors, state = self._tensors(header)
            _broadcast_tensors(group, tensors, source)
            if group.rank != source:
                self._adopt(header, state)
        # self.world is now the source's: the size of the group that trained this state.
        self.ramp = self.schedule.after_change(self.step, self.world, group.world_size, self.ramp)
        self.world = group.world_size
        self.has_state = True
        return source

    def _header(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()["state"]
        slots = []
        for index in range(len(self.params)):
            entry = {}
            for key, value in sorted(state.get(index, {}).items()):
                if isinstance(value, torch.Tensor):
                    entry[key] = {"dtype": dtype_name(value.dtype), "shape": list(value.shape)}
                elif value is None or isinstance(value, (bool, int, float)):
                    entry[key] = {"value": value}
                else:
                    raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}")
            slots.append(entry)
        return {
            "step": self.step,
            "position": self.position,
            "world": self.world,
            "ramp": [self.ramp.start_step, self.ramp.from_lr] if self.ramp else None,
            "optimizer": slots,
        }

    def _tensors(
        self, header: dict[str, Any]
    ) -> tuple[list[torch.Tensor], dict[int, dict[str, Any]]]:
        """Everything to broadcast, in one order on every rank; receivers get fresh tensors."""
        tensors = [p.data for p in self.params] + list(self.model.buffers())
        mine = self.optimizer.state_dict()["state"]
        state: dict[int, dict[str, Any]] = {}
        for index, slot in enumerate(header["optimizer"]):
            if not slot:
                continue
            state[index] = {}
            for key, meta in slot.items():
                if "value" in meta:
                    state[index][key] = meta["value"]
                    continue
                have = mine.get(index, {}).get(key)
                dtype = DTYPES[meta["dtype"]]
                if (
                    not isinstance(have, torch.Tensor)
                    or have.dtype != dtype
                    or list(have.shape) != meta["shape"]
                ):
                    have = torch.empty(meta["shape"], dtype=dtype, device=self.device)
                state[index][key] = have
                tensors.append(have)
        return tensors, state

    def _adopt(self, header: dict[str, Any], state: dict[int, dict[str, Any]]) -> None:
        current = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        self.step = int(header["step"])
        self.position = int(header["position"])
        self.world = int(header["world"])
        self.ramp = Ramp(*header["ramp"]) if header["ramp"] else None


def _broadcast_json(
    group: ElasticGroup, value: Any, source: int, device: torch.device
) -> dict[str, Any]:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    data = json.dumps(value).encode() if group.rank == source else b""
    size[0] = len(data)
    group.broadcast(size, source)
    buffer = torch.zeros(int(size[0]), dtype=torch.uint8, device=device)
    if group.rank == source:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    group.broadcast(buffer, source)
    return json.loads(bytes(buffer.cpu().numpy()))


def _broadcast_tensors(group: ElasticGroup, tensors: list[torch.Tensor], source: int) -> None:
    """One broadcast per dtype: flatten, broadcast, copy back into place."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        group_tensors = by_dtype[dtype]
        flat = _flatten_dense_tensors(group_tensors)
        group.broadcast(flat, source)
        if group.rank != source:
            for t, synced in zip(
                group_tensors, _unflatten_dense_tensors(flat, group_tensors), strict=True
            ):
                t.copy_(synced)
