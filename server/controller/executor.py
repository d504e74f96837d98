"""One job's work runs one piece at a time: a serial executor per job over a shared pool.

Reconcile passes, submits, cancels, switches, checkpoints and completions
of one job used to run on whichever thread asked (the reconcile loop, gRPC
handler threads, background threads) and raced: a seal decided before a
cancel could land after it. Here every piece of work about a job is a task
queued on that job's lane; a lane runs its tasks in order on a small shared
thread pool, so different jobs proceed in parallel and one job never
interleaves with itself. Conditional writes (see :mod:`.writes`) remain the
backstop for what a lane cannot order: a second controller, a deposed leader.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

POOL_THREADS = 8  # jobs whose work runs at the same moment


class JobLanes:
    def __init__(self, threads: int = POOL_THREADS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="job")
        self._lock = threading.Lock()
        self._queues: dict[str, deque[tuple[Callable[[], object], Future, str]]] = {}
        self._running: set[str] = set()
        self._pending_kinds: dict[str, set[str]] = {}

    def submit(self, job_id: str, fn: Callable[[], T], kind: str = "") -> Future[T]:
        """Queue ``fn`` on ``job_id``'s lane.

        A ``kind`` coalesces: while a task of that kind waits in the lane (not
        yet started), another is not queued and the waiting one's future is
        returned. Reconcile passes use this, so a burst of wake-ups costs one pass.
        """
        with self._lock:
            if kind and kind in self._pending_kinds.get(job_id, set()):
                for _, fut, k in self._queues[job_id]:
                    if k == kind:
                        return fut
            fut: Future = Future()
            self._queues.setdefault(job_id, deque()).append((fn, fut, kind))
            if kind:
                self._pending_kinds.setdefault(job_id, set()).add(kind)
            if job_id not in self._running:
                self._running.add(job_id)
                self._pool.submit(self._drain, job_id)
            return fut

    def run(self, job_id: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` on the job's lane and return its result (or raise its exception)."""
        return self.submit(job_id, fn).result(timeout)

    def _drain(self, job_id: str) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(job_id)
                if not queue:
                    self._running.discard(job_id)
                    self._queues.pop(job_id, None)
                    self._pending_kinds.pop(job_id, None)
                    return
                fn, fut, kind = queue.popleft()
                if kind:
                    self._pending_kinds[job_id].discard(kind)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to whoever waits on the future
                fut.set_exception(exc)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OffLane:
    """Work about a job that must not hold up its lane (storage I/O), one at a time per job."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: set[str] = set()

    def start(self, job_id: str, fn: Callable[[], None], done: Callable[[], None]) -> bool:
        """Start ``fn`` on its own thread unless one runs for ``job_id``; ``done`` runs after."""
        with self._cond:
            if job_id in self._running:
                log.info("event=job_task_skipped job=%s reason=one is under way", job_id)
                return False
            self._running.add(job_id)

        def run() -> None:
            try:
                fn()
            except Exception as exc:
                log.warning(
                    "event=job_task_failed job=%s error=%s: %s", job_id, type(exc).__name__, exc
                )
            finally:
                self._release(job_id)
                done()

        threading.Thread(target=run, name=f"job-{job_id}", daemon=True).start()
        return True

    def run(self, job_id: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this thread, after the task under way for ``job_id`` (if any) ends."""
        with self._cond:
            self._cond.wait_for(lambda: job_id not in self._running)
            self._running.add(job_id)
        try:
            return fn()
        finally:
            self._release(job_id)

    def _release(self, job_id: str) -> None:
        with self._cond:
            self._running.discard(job_id)
            self._cond.notify_all()
