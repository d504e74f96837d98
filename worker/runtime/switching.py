"""Switching a running job between ps-async and allreduce at a step boundary.

The controller seals a generation whose assignment names the other mode. The
running mode notices it at a step boundary, packs its state into a
:class:`~elasticd.worker.runtime.handover.Handover` and returns a
:class:`Switch`; the runtime then starts the other mode with that state:

* ps-async → allreduce: every worker exports the shards (parameters and
  torch.optim state) from the PS tier; all replicas start identical;
* allreduce → ps-async: rank 0 imports its replica into the shards (replacing
  them, at the job's step as version); the others wait until the shards show
  the new generation at that version.

Nothing goes through object storage, and the state moves bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import torch

from elasticd.jobspec import JobSpec
from elasticd.placement import ShardPlacement
from elasticd.ps_client import PSTier
from elasticd.ps_errors import PSUnavailable
from elasticd.slicing import join_slices, split_state
from elasticd.worker.runtime import heartbeat
from elasticd.worker.runtime.control import Assignment
from elasticd.worker.runtime.handover import (
    Handover,
    load_named_optimizer_state,
    named_optimizer_state,
)

IMPORT_WAIT_S = 120.0  # how long non-zero ranks wait for rank 0's import

log = logging.getLogger(__name__)


@dataclass
class Switch:
    """Returned by a mode that must hand over: run ``assignment`` with ``handover``."""

    assignment: Assignment
    handover: Handover


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def from_model(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, position: int
) -> Handover:
    names = trainable_names(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return Handover(params, named_optimizer_state(optimizer, names), step, position)


def into_model(
    handover: Handover, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    names = trainable_names(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in handover.params:
                p.copy_(handover.params[n].to(p.device))
    device = next(model.parameters()).device
    state = {
        n: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for n, entry in handover.optimizer_state.items()
    }
    load_named_optimizer_state(optimizer, names, state)


def placement_of(a: Assignment) -> ShardPlacement:
    return ShardPlacement.from_json(json.dumps(a.placement))


def from_ps(tier: PSTier, placement: ShardPlacement) -> Handover:
    """The PS tier's state as a replica's: parameters, optimizer state, step."""
    payloads = tier.export_state()
    params, named = join_slices(placement, payloads)
    step = min(int(meta["version"]) for _, _, meta in payloads.values())
    return Handover(params, named, step, position=step)


def into_ps(tier: PSTier, a: Assignment, spec: JobSpec, handover: Handover) -> tuple[str, str]:
    """Rank 0 writes the replica into the shards; the other ranks wait for it.

    Returns (digest sent, digest the shards hold), combined over the PS tier,
    on rank 0; empty strings elsewhere.
    """
    placement = placement_of(a)
    if a.rank == 0:
        digests = tier.import_state(
            split_state(placement, handover.params, handover.optimizer_state),
            spec.optimizer.name,
            spec.optimizer.kwargs,
            spec.ps.max_staleness,
            workers=a.world_size,
            max_version=spec.steps,
            version=handover.step,
        )
        sent = hashlib.sha256("".join(digests[p][0] for p in sorted(digests)).encode())
        held = hashlib.sha256("".join(digests[p][1] for p in sorted(digests)).encode())
        return sent.hexdigest(), held.hexdigest()
    deadline = time.monotonic() + IMPORT_WAIT_S
    while True:
        heartbeat.beat()
        try:
            infos = tier.info()
            if all(
                i.exists and i.generation >= a.generation and i.version >= handover.step
                for i in infos.values()
            ):
                return "", ""
        except PSUnavailable:  # a PS not reachable yet: ask again
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank 0 did not import the replica into the PS tier in {IMPORT_WAIT_S}s"
            )
        time.sleep(0.05)


SWITCH_WAIT_S = 30.0  # how long allreduce ranks wait at a scheduled switch for its generation


def switch_scheduled(spec: JobSpec, step: int) -> bool:
    """Whether the spec schedules a switch away from allreduce at ``step``."""
    return any(s.at_step == step and s.mode != "allreduce" for s in spec.switch)


def await_switch(feed, generation: int, step: int) -> bool:
    """At a scheduled switch, an allreduce rank waits for its generation instead of stepping
    past it, so every rank stops at the step the schedule names. True once a generation
    newer than ``generation`` arrived; False after SWITCH_WAIT_S (the controller refused
    the switch: training goes on)."""
    deadline = time.monotonic() + SWITCH_WAIT_S
    while time.monotonic() < deadline and not feed.closed:
        heartbeat.beat()
        feed.refresh()
        if feed.current.generation > generation:
            return True
        time.sleep(0.02)
    log.warning(
        "event=scheduled_switch_missed job=%s step=%d waited_s=%g",
        feed.current.job_id,
        step,
        SWITCH_WAIT_S,
    )
    return False
