"""Training progress that workers report over gRPC, kept in the controller's memory.

Progress is per step, so it never goes to etcd (ARCHITECTURE invariant 1):
the job record in etcd is brought up to date from it only on events (a seal,
a checkpoint, the end of the job). A new leader starts with an empty book and
fills it from the next reports.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from elasticd.membership import Generation
from elasticd.server.controller.records import TERMINAL, JobRecord


class NotAMember(Exception):
    """A progress report from a worker outside the job's sealed generation: not counted.

    Without this check any caller could move a running job's step (and with it a
    scheduled checkpoint or mode switch) by reporting under a made-up worker id.
    """

    def __init__(self, job_id: str, worker: str, generation: int) -> None:
        super().__init__(
            f"worker {worker!r} is not a member of job {job_id}'s sealed generation "
            f"(it reported generation {generation}): its progress does not count"
        )


def is_member(generation: Generation | None, worker: str) -> bool:
    return generation is not None and any(m.worker_id == worker for m in generation.members)


@dataclass(frozen=True)
class Progress:
    generation: int
    step: int
    loss: float
    finished: bool
    at: float


class ProgressBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[str, dict[str, Progress]] = {}
        self._first_loss: dict[str, float] = {}

    def record(
        self, job_id: str, worker: str, generation: int, step: int, loss: float, finished: bool
    ) -> bool:
        """Keep a worker's report; True if it carried the job's first loss."""
        with self._lock:
            per_job = self._by_job.setdefault(job_id, {})
            before = per_job.get(worker)
            if math.isnan(loss) and before is not None:
                loss = before.loss  # a report without a loss keeps the last one
            per_job[worker] = Progress(generation, step, loss, finished, time.time())
            first = job_id not in self._first_loss and not math.isnan(loss)
            if first:
                self._first_loss[job_id] = loss
            return first

    def of(self, job_id: str) -> dict[str, Progress]:
        with self._lock:
            return dict(self._by_job.get(job_id, {}))

    def live(self, record: JobRecord) -> JobRecord:
        """The stored record, brought up to date with reported progress."""
        progress = self.of(record.job_id)
        if record.state in TERMINAL or not progress:
            return record
        # Reports from before the last restore count no more: that state was lost.
        progress = {w: p for w, p in progress.items() if p.generation >= record.restored_generation}
        if not progress:
            return record
        current = [p for p in progress.values() if p.generation == record.generation]
        losses = [p.loss for p in current or progress.values() if not math.isnan(p.loss)]
        with self._lock:
            first = self._first_loss.get(record.job_id, math.nan)
        return record.evolve(
            step=max(record.step, max(p.step for p in progress.values())),
            loss=sum(losses) / len(losses) if losses else record.loss,
            first_loss=record.first_loss if not math.isnan(record.first_loss) else first,
        )
