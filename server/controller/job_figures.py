"""What the controller counts about its jobs for the metrics: recoveries and checkpoints.

A recovery runs from the reconcile pass that sees a member of the running
generation gone, failed or restarting (it seals the next generation at once,
ARCHITECTURE invariant 9) to the first progress report of the new generation.
A ps-async process restarted in place (its state is on the PS tier, the
generation stays) recovers from the pass that sees its agent count the restart
to the first report of the new process. A new leader starts from the restarts
it finds, and counts only those that follow. A checkpoint's duration is the
time the controller waited for the PS shards to be written and the manifest
committed; its bytes are the shards' sizes in the manifest.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

from elasticd.server.ps.metrics import Histogram

# Seconds: a recovery is about a second on a local cluster, a minute when a restore reads a lot.
RECOVERY_SECONDS_BOUNDS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
CHECKPOINT_SECONDS_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


@dataclass
class JobCounts:
    recoveries: int = 0
    recovery_seconds: Histogram = field(default_factory=lambda: Histogram(RECOVERY_SECONDS_BOUNDS))
    checkpoints: int = 0
    checkpoint_bytes: int = 0
    checkpoint_seconds: Histogram = field(
        default_factory=lambda: Histogram(CHECKPOINT_SECONDS_BOUNDS)
    )

    def copy(self) -> JobCounts:
        return JobCounts(
            self.recoveries,
            self.recovery_seconds.copy(),
            self.checkpoints,
            self.checkpoint_bytes,
            self.checkpoint_seconds.copy(),
        )


class JobFigures:
    """Thread-safe: seals run on the job lanes, reports on gRPC threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, JobCounts] = defaultdict(JobCounts)
        # (job, worker or "" for the whole job) -> (generation, since)
        self._recovering: dict[tuple[str, str], tuple[int, float]] = {}
        self._restarts: dict[tuple[str, str], int] = {}  # restarts seen per (job, worker)

    def recovery_began(self, job_id: str, generation: int, since: float) -> None:
        """Generation ``generation`` replaces one that lost a member, seen at ``since``."""
        with self._lock:
            started = self._recovering.get((job_id, ""), (generation, since))[1]
            self._recovering[job_id, ""] = (generation, min(started, since))

    def saw_restarts(
        self, job_id: str, generation: int, restarts: dict[str, int], now: float
    ) -> None:
        """The agents' restart counts of the job's workers, as a reconcile pass sees them."""
        with self._lock:
            for worker, n in restarts.items():
                key = (job_id, worker)
                before = self._restarts.get(key)
                self._restarts[key] = n
                if before is not None and n > before and key not in self._recovering:
                    self._recovering[key] = (generation, now)

    def reported(self, job_id: str, worker: str, generation: int, now: float) -> None:
        """``worker`` reported progress in ``generation``: a recovery it ends is counted."""
        with self._lock:
            for key in ((job_id, ""), (job_id, worker)):
                pending = self._recovering.get(key)
                if pending is None or generation < pending[0]:
                    continue
                del self._recovering[key]
                counts = self._counts[job_id]
                counts.recoveries += 1
                counts.recovery_seconds.observe(max(now - pending[1], 0.0))

    def checkpointed(self, job_id: str, seconds: float, nbytes: int) -> None:
        with self._lock:
            counts = self._counts[job_id]
            counts.checkpoints += 1
            counts.checkpoint_bytes += nbytes
            counts.checkpoint_seconds.observe(seconds)

    def of(self, job_id: str) -> JobCounts:
        with self._lock:
            counts = self._counts.get(job_id)
            return counts.copy() if counts is not None else JobCounts()

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._counts.pop(job_id, None)
            for table in (self._recovering, self._restarts):
                for key in [k for k in table if k[0] == job_id]:
                    del table[key]
