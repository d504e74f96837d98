"""Synchronous rounds (``max_staleness`` == 0) of a :class:`~.shard.ParameterShard`.

The shard collects one push per worker of the generation for the current
version, applies their mean in one optimizer step, and only then answers the
pushers. The mean is summed in worker-id order, so the result does not depend
on which push arrived first. A round that cannot complete (the generation
changed, it timed out, its caller went away, the backup failed) is aborted:
its waiters raise, and nothing of it is applied.

A mixin: every method here runs with the shard's lock held, on the shard's state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from elasticd.server.ps.rules import (
    BadRequest,
    DuplicatePush,
    PushResult,
    ReplicaUnavailable,
    RoundAborted,
    ShardError,
    SyncRound,
    mean_gradient,
)

log = logging.getLogger("elasticd.server.ps.shard")

_WAIT_SLICE_S = 0.25  # how often a waiting pusher checks whether its caller went away


class SynchronousRounds:
    def pending_workers(self) -> list[str]:
        """Workers whose push waits in the open synchronous round."""
        with self.lock:
            return sorted(self._round.grads) if self._round else []

    def _abort_round(self, reason: str, error: type[ShardError] = RoundAborted) -> None:
        """Release the waiters of the open synchronous round without applying it."""
        r, self._round = self._round, None
        r.aborted, r.error = reason, error  # each waiter raises it, and counts itself rejected
        log.info(
            "event=sync_round_aborted job=%s version=%d pushes=%d reason=%r",
            self.config.job_id,
            r.version,
            len(r.grads),
            reason,
        )
        self._changed.notify_all()

    def _join_round(
        self,
        worker_id: str,
        push_id: int,
        batch: int,
        grads: list[torch.Tensor],
        timeout: float,
        cancelled: Callable[[], bool] | None,
    ) -> PushResult:
        if not worker_id:
            raise BadRequest("a synchronous push must name its worker (worker_id is empty)")
        r = self._round
        if r is None:
            r = self._round = SyncRound(self.version, self.generation)
        if worker_id in r.grads:
            raise DuplicatePush(
                f"worker {worker_id!r} already pushed for version {r.version}; the round "
                f"waits for {self.config.workers - len(r.grads)} more worker(s)"
            )
        r.grads[worker_id] = grads
        r.push_ids[worker_id] = push_id
        r.batches[worker_id] = batch
        if len(r.grads) >= self.config.workers:
            self._complete_round(r)
        deadline = time.monotonic() + timeout
        while r.outcome is None and not r.aborted:
            remaining = deadline - time.monotonic()
            gone = cancelled is not None and cancelled()
            if remaining <= 0 or gone:
                del r.grads[worker_id]
                r.push_ids.pop(worker_id, None)
                r.batches.pop(worker_id, None)
                if gone:
                    raise RoundAborted(f"push of worker {worker_id!r} cancelled by its caller")
                raise RoundAborted(
                    f"synchronous round for version {r.version} timed out after {timeout:g}s "
                    f"with {len(r.grads) + 1} of {self.config.workers} workers' gradients: "
                    "pull and push again"
                )
            self._changed.wait(min(remaining, _WAIT_SLICE_S))
        if r.aborted:
            raise r.error(r.aborted)
        return r.outcome

    def _complete_round(self, r: SyncRound) -> None:
        try:
            contributors = [(w, r.push_ids[w], r.batches[w]) for w in sorted(r.grads)]
            self._commit(mean_gradient(r.grads), contributors)
        except ReplicaUnavailable as exc:
            self._abort_round(
                f"the round for version {r.version} was not applied: {exc}", ReplicaUnavailable
            )
            return
        for _ in r.grads:
            self.stats.applied(0)
        r.outcome = PushResult(self.version, True, 0)
        self._round = None
        log.debug(
            "event=sync_round_applied job=%s version=%d pushes=%d",
            self.config.job_id,
            self.version,
            len(r.grads),
        )
        self._changed.notify_all()
