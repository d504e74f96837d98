"""A worker's progress report: counted only from a member, and what it sets off.

A report moves the job's step and loss in the controller's memory
(:mod:`.progress`). On the leader it may also start a checkpoint that is due,
queue a mode switch scheduled at this step, or tell an allreduce job's ranks
to checkpoint. A report from a worker outside the sealed generation counts
for nothing (:class:`.progress.NotAMember`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from elasticd.membership import Generation
from elasticd.server.controller import checkpoints
from elasticd.server.controller.modes import switch_due
from elasticd.server.controller.planning import JobSnapshot
from elasticd.server.controller.progress import NotAMember, is_member
from elasticd.server.controller.records import TERMINAL
from elasticd.server.controller.view import JobNotFound

if TYPE_CHECKING:
    from elasticd.server.controller.controller import Controller

log = logging.getLogger(__name__)


def record_report(
    c: Controller, job_id: str, worker: str, generation: int, step: int, loss: float,
    finished: bool,
) -> tuple[bool, bool]:  # fmt: skip
    """Returns (the job is over for the worker, an allreduce job's ranks are to take a
    checkpoint)."""
    try:
        snap = c.snapshot(job_id)
    except JobNotFound:
        return True, False  # nothing is kept for a job that does not exist
    if not reports_to(c, snap, worker, generation):
        raise NotAMember(job_id, worker, generation)
    c.figures.reported(job_id, worker, generation, time.time())
    if c.progress.record(job_id, worker, generation, step, loss, finished):
        log.info("event=first_loss job=%s worker=%s step=%d loss=%.4f", job_id, worker, step, loss)
    rec = snap.record
    c.scalars.reported(snap, step, loss, c.progress.steps_per_s(job_id))
    wanted = c.is_leader and c.rank_checkpoints.wanted(snap, time.time())
    if c.is_leader and checkpoints.checkpoint_due(snap, step, time.time()):
        c._start_background(job_id, lambda: checkpoints.take_checkpoint(c, job_id))
    due = switch_due(snap, step)
    if c.is_leader and due is not None:
        reason = f"scheduled at step {due.at_step}"

        def switch() -> None:
            c._switch(job_id, due.mode, reason, True, rec.switches_done)

        c.lanes.submit(job_id, lambda: c._guarded(job_id, switch), kind="switch")
    return rec.state in TERMINAL, wanted


def reports_to(c: Controller, snap: JobSnapshot, worker: str, generation: int) -> bool:
    """Whether ``worker`` is a member of the job's sealed generation."""
    gen = snap.generation  # a seal newer than the cache's is read from etcd itself
    if gen is None or generation > gen.number:
        kv = c.client.get(c.keys.generation(snap.record.job_id))
        gen = Generation.from_json(kv.value) if kv else None
    return is_member(gen, worker)
