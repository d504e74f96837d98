"""What users see of a job: its JobStatus, built from the record, the generation,
the agents' reports and the progress workers report; and the filters of ListJobs.

A worker's state comes from where it is known: its progress reports (the modes
elasticd trains report every few steps), else its agent's report in etcd (a
script reports nothing to the controller: its agent says whether it is
starting, running, restarting or done), else the final states the job record
kept when the job ended (the agents withdraw their reports then).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from elasticd.rpc import job_pb2
from elasticd.server.controller.controller import Controller
from elasticd.server.controller.progress import Progress, samples_per_step
from elasticd.server.controller.records import TERMINAL, JobRecord

STATES = ("PENDING", "WAITING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")

# What a WatchJob stream sends a new status for; the rest (updated_at, ...) changes
# without anything a person would notice.
WATCHED = (
    "state",
    "step",
    "loss",
    "samples_per_s",
    "generation",
    "checkpoint",
    "mode",
    "message",
    "restarts",
    "min_workers",
    "max_workers",
)


def worker_state(p: Progress | None, report, record: JobRecord, worker_id: str) -> str:
    """An ended job's kept states first; then what the agent knows beyond "alive" (the
    process exited, restarts, waits ready); then the worker's own reports."""
    if record.state in TERMINAL and worker_id in record.final_workers:
        return record.final_workers[worker_id]
    if report is not None and report.state not in ("STARTING", "RUNNING"):
        return report.state
    if p is not None:
        return "FINISHED" if p.finished else "RUNNING"
    return report.state if report is not None else "STARTING"


def status_message(controller: Controller, job_id: str) -> job_pb2.JobStatus:
    record, gen, progress = controller.status(job_id)
    snap = controller.snapshot(job_id)
    placement = snap.placement
    shown = placement is not None and record.mode == "ps-async"
    held = placement.bytes_per_ps() if shown else {}
    backups = placement.backup_bytes_per_ps() if shown else {}
    workers = []
    restarts = record.restarts
    if gen is not None:
        for m in gen.members:
            p = progress.get(m.worker_id)
            report = snap.workers.get(m.worker_id)
            if report is not None and report.generation != gen.number:
                report = None  # about an earlier generation
            restarts = max(restarts, report.restarts if report else 0)
            workers.append(
                job_pb2.WorkerStatus(
                    worker_id=m.worker_id,
                    node_id=m.node_id,
                    rank=m.rank,
                    state=worker_state(p, report, record, m.worker_id),
                    step=p.step if p else 0,
                    loss=p.loss if p else math.nan,
                    restarts=report.restarts if report else 0,
                )
            )
    running = record.state not in TERMINAL
    rate = controller.progress.steps_per_s(job_id) if running else 0.0
    per_step = samples_per_step(snap.spec, record.mode, len(workers))
    return job_pb2.JobStatus(
        job_id=record.job_id,
        name=record.name,
        state=record.state,
        mode=record.mode,
        generation=record.generation,
        workers=workers,
        step=record.step,
        total_steps=record.total_steps,
        loss=record.loss,
        first_loss=record.first_loss,
        checkpoint=record.checkpoint,
        message=record.message,
        submitted_at=record.submitted_at,
        updated_at=record.updated_at,
        ps=[
            job_pb2.PSHolding(ps_id=p, bytes=n, backup_bytes=backups.get(p, 0))
            for p, n in sorted(held.items())
        ],
        restored_from=record.restored_from,
        restored_step=record.restored_step,
        updates_lost=record.updates_lost,
        owner=record.owner,
        steps_per_s=rate,
        samples_per_s=rate * per_step,
        restarts=restarts,
        min_workers=snap.spec.workers.min,
        max_workers=snap.spec.workers.max,
    )


def changed(before: job_pb2.JobStatus | None, now: job_pb2.JobStatus) -> bool:
    """Whether a watcher who saw ``before`` should be sent ``now``."""
    if before is None:
        return True
    workers = [(w.worker_id, w.state) for w in now.workers]
    if workers != [(w.worker_id, w.state) for w in before.workers]:
        return True
    for name in WATCHED:
        a, b = getattr(before, name), getattr(now, name)
        if a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
            return True
    return False


def filter_errors(states: Iterable[str], mode: str) -> list[str]:
    """What is wrong with a ListJobs request's filters, field by field."""
    from elasticd.jobspec import MODES

    errors = [
        f"states: {s!r} is not a job state (one of {', '.join(STATES)})"
        for s in states
        if s not in STATES
    ]
    if mode and mode not in MODES:
        errors.append(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    return errors


def matches(s: job_pb2.JobStatus, request: job_pb2.ListJobsRequest) -> bool:
    return (
        (not request.states or s.state in request.states)
        and (not request.name or s.name == request.name)
        and (not request.mode or s.mode == request.mode)
        and (not request.owner or s.owner == request.owner)
    )
