"""Switching a running job between ps-async and allreduce: what the controller decides.

A switch is a generation with the same workers and the other mode in their
assignments (see docs/design.md, "Modes share one runtime"). This module
decides whether a switch may happen now; the controller seals it.
"""

from __future__ import annotations

from elasticd.jobspec import SWITCHABLE, ModeSwitch
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot, Seal, ps_trouble
from elasticd.server.controller.records import RUNNING, JobRecord


class SwitchRefused(ValueError):
    """A mode switch that cannot happen now; the message says why."""


def plan_switch(
    snap: JobSnapshot, cluster: ClusterSnapshot, mode: str, reason: str, scheduled: bool
) -> tuple[JobRecord, Seal | None]:
    """The job's record after the switch, and the seal that carries it (None: no seal,
    the job is already in ``mode``). Raises SwitchRefused with the reason otherwise."""
    rec = snap.record
    job_id = rec.job_id
    if mode not in SWITCHABLE or rec.mode not in SWITCHABLE:
        raise SwitchRefused(
            f"only {' and '.join(SWITCHABLE)} jobs switch between those modes "
            f"(job {job_id} is {rec.mode}, asked for {mode!r})"
        )
    if rec.state != RUNNING or snap.generation is None or not snap.generation.members:
        raise SwitchRefused(f"job {job_id} is {rec.state}; only a running job switches modes")
    done = rec.switches_done + (1 if scheduled else 0)
    if mode == rec.mode:
        return rec.evolve(switches_done=done), None
    if mode == "ps-async":
        if not cluster.ps:
            raise SwitchRefused("no parameter server is registered to switch to ps-async")
        moved = JobSnapshot(
            snap.spec, rec.evolve(mode=mode), snap.generation, snap.workers, snap.placement
        )
        trouble = ps_trouble(moved, cluster)
        if trouble:
            raise SwitchRefused(f"cannot switch job {job_id} to ps-async: {trouble}")
    workers = tuple(sorted(snap.generation.worker_ids))
    return rec.evolve(mode=mode, switches_done=done), Seal(workers, reason or f"switch to {mode}")


def switch_due(snap: JobSnapshot, step: int) -> ModeSwitch | None:
    """The spec's next scheduled switch, if a report of ``step`` reached it on a running job."""
    rec, schedule = snap.record, snap.spec.switch
    if rec.state != RUNNING or rec.switches_done >= len(schedule):
        return None
    due = schedule[rec.switches_done]
    return due if step >= due.at_step else None
