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
from collections import deque
from dataclasses import dataclass

from elasticd.jobspec import JobSpec
from elasticd.membership import Generation
from elasticd.server.controller.records import TERMINAL, JobRecord

RATE_WINDOW_S = 10.0  # steps/s is measured over the reports of the last this many seconds


def samples_per_step(spec: JobSpec, mode: str, world: int) -> int:
    """Samples one step of the job consumes: every rank's batch in allreduce and in a
    synchronous PS round (one version per round), one worker's batch per asynchronous
    push; 0 for a script, whose steps elasticd does not count."""
    if mode == "allreduce" or (mode == "ps-async" and spec.ps.max_staleness == 0):
        return spec.batch_size * world
    return spec.batch_size if mode == "ps-async" else 0


def steps_per_s(samples: deque[tuple[float, int]], now: float) -> float:
    """The job's step rate over ``samples`` (time, step), newest last; 0 once reports stop."""
    if len(samples) < 2 or now - samples[-1][0] > RATE_WINDOW_S:
        return 0.0
    (t0, s0), (t1, s1) = samples[0], samples[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


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
        self._steps: dict[str, deque[tuple[float, int]]] = {}  # job -> (time, job step)
        self.changed = threading.Condition(self._lock)  # notified on every report

    def record(
        self, job_id: str, worker: str, generation: int, step: int, loss: float, finished: bool
    ) -> bool:
        """Keep a worker's report; True if it carried the job's first loss."""
        with self._lock:
            per_job = self._by_job.setdefault(job_id, {})
            before = per_job.get(worker)
            if math.isnan(loss) and before is not None:
                loss = before.loss  # a report without a loss keeps the last one
            now = time.time()
            per_job[worker] = Progress(generation, step, loss, finished, now)
            first = job_id not in self._first_loss and not math.isnan(loss)
            if first:
                self._first_loss[job_id] = loss
            self._sample_step(job_id, now, max(p.step for p in per_job.values()))
            self.changed.notify_all()
            return first

    def _sample_step(self, job_id: str, now: float, step: int) -> None:
        samples = self._steps.setdefault(job_id, deque())
        if samples and step < samples[-1][1]:
            samples.clear()  # a restore went back: the rate starts again
        samples.append((now, step))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()

    def steps_per_s(self, job_id: str) -> float:
        with self._lock:
            samples = self._steps.get(job_id)
            return steps_per_s(samples, time.time()) if samples else 0.0

    def notify(self) -> None:
        """Wake the waiters of :meth:`wait_for_report` (something else changed)."""
        with self.changed:
            self.changed.notify_all()

    def wait_for_report(self, timeout: float) -> None:
        """Block until some worker reports, or ``timeout``."""
        with self.changed:
            self.changed.wait(timeout)

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
