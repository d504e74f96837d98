"""ScaleJob: new worker bounds for a running job, kept where a new leader reads them.

The bounds are part of the job's spec in etcd, so rewriting the spec (with the
record, in one conditional write) is what persists them: every later
planning decision, this leader's or the next one's, reads them from there
(:func:`.planning.decide` fills slots up to ``workers.max`` and waits below
``workers.min``). Workers see the new spec in their next generation's
assignment. A minimum above the workers the job has ends its running
generation: the job waits, and an allreduce job's processes wait with it,
keeping their replicas, until enough workers are there (or the minimum is
lowered again).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from elasticd.coord.etcd import Put
from elasticd.jobspec import WorkersSpec, workers_errors
from elasticd.server.controller.records import TERMINAL, JobRecord

log = logging.getLogger(__name__)


class NotScalable(Exception):
    """The job has ended: its bounds no longer mean anything."""


class BadBounds(ValueError):
    """The new bounds are malformed; the message names the field."""


def check_bounds(wmin: int, wmax: int) -> None:
    """Raise BadBounds unless 1 <= wmin <= wmax <= MAX_WORKERS."""
    errors = workers_errors(wmin, wmax, "")
    if errors:
        raise BadBounds(
            "; ".join(f"{e.split(':')[0]}_workers:{e.split(':', 1)[1]}" for e in errors)
        )


def scale(controller, job_id: str, wmin: int, wmax: int) -> JobRecord:
    """Rewrite the job's bounds (on its lane); the next reconcile pass plans with them."""
    check_bounds(wmin, wmax)
    snap = controller.snapshot(job_id)
    if snap.record.state in TERMINAL:
        raise NotScalable(
            f"job {job_id} has ended ({snap.record.state}): only a job that has not ended "
            "can be scaled; submit it again with --resume-from to train more"
        )
    before = snap.spec.workers
    spec = replace(snap.spec, workers=WorkersSpec(wmin, wmax))
    record = snap.record.evolve(
        message=f"scaled from {before.min}..{before.max} to {wmin}..{wmax} workers"
    )
    controller.writer.update(
        snap,
        [
            Put(controller.keys.job_spec(job_id), spec.to_json().encode()),
            controller.record_put(record),
        ],
    )
    log.info(
        "event=job_scaled job=%s generation=%d min=%d max=%d before_min=%d before_max=%d",
        job_id,
        snap.record.generation,
        wmin,
        wmax,
        before.min,
        before.max,
    )
    controller.wake()
    return controller.snapshot(job_id).record
