"""When a membership change is sealed: departures at once, joins after the join window.

The decision is pure (:func:`~elasticd.server.controller.planning.seal_at_once`
and :func:`~elasticd.server.controller.planning.last_call`); this is the
controller's memory of the joins that wait, one per job.
"""

from __future__ import annotations

import threading

from elasticd.jobspec import JobSpec
from elasticd.server.controller.planning import PendingChange, Seal, last_call, seal_at_once

JOIN_WINDOW_S = 1.0  # a join must hold this long before it is sealed
# ...unless changes keep coming for this many join windows: then seal anyway.
JOIN_WINDOW_MAX_FACTOR = 10


class JoinWindow:
    def __init__(self, window_s: float = JOIN_WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._pending: dict[str, PendingChange] = {}

    def due(
        self,
        job_id: str,
        action: Seal,
        current: frozenset[str],
        running: frozenset[str],
        spec: JobSpec,
        now: float,
    ) -> tuple[Seal | None, float]:
        """(what to seal now, or None; how long until a waiting join is due)."""
        at_once = seal_at_once(action, current, spec, running)
        with self._lock:
            if at_once is not None:
                self._pending.pop(job_id, None)
                return at_once, 0.0
            pending, wait = last_call(
                self._pending.get(job_id),
                action.workers,
                now,
                self.window_s,
                self.window_s * JOIN_WINDOW_MAX_FACTOR,
            )
            if wait > 0:
                self._pending[job_id] = pending
                return None, wait
            self._pending.pop(job_id, None)
            return action, 0.0

    def forget(self, job_id: str) -> None:
        """The job wants no change (any more)."""
        with self._lock:
            self._pending.pop(job_id, None)
