"""A ps-async worker's side of the data leases (server/controller/data_leases.py).

The worker trains on the batch indices of one leased range at a time. An
index counts as done once every PS shard applied its gradient or refused it
as applied already; a push refused as stale is computed again on the same
index, so no batch of a range is skipped. When the range is done, the next
call returns it to the controller as finished and leases the next.

A controller that does not answer (a fail-over) or that does not know the
worker as a member yet is asked again shortly: the caller gets None and goes
on polling its assignment meanwhile.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import grpc

from elasticd.rpc import job_pb2, job_pb2_grpc

log = logging.getLogger(__name__)

LEASE_TIMEOUT_S = 10.0  # one LeaseData call
RETRY_S = 0.2  # after a refused or unanswered call, ask again this much later


class LeasedBatches:
    def __init__(
        self,
        coordinator: Callable[[], job_pb2_grpc.TrainingCoordinatorStub],
        job_id: str,
        worker_id: str,
        start_hint: int = 0,
    ) -> None:
        """``coordinator()`` is the current controller's stub (it follows a fail-over)."""
        self.job_id, self.worker_id = job_id, worker_id
        self.holder = secrets.token_hex(8)  # this process: a restart gets a new name
        self.start_hint = start_hint
        self._coordinator = coordinator
        self._range: tuple[int, int] | None = None
        self._at = 0  # the next index of the range not yet done
        self._finished: list[tuple[int, int]] = []

    def next(self, generation: int) -> int | None:
        """The batch index to train on now, or None: nothing to hand out yet, ask again."""
        if self._range is not None and self._at < self._range[1]:
            return self._at
        if self._range is not None:
            self._finished.append(self._range)
            self._range = None
        try:
            reply = self._coordinator().LeaseData(
                job_pb2.DataLeaseRequest(
                    job_id=self.job_id,
                    generation=generation,
                    worker_id=self.worker_id,
                    holder=self.holder,
                    finished=[job_pb2.BatchRange(start=s, end=e) for s, e in self._finished],
                    start_hint=self.start_hint,
                ),
                timeout=LEASE_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            log.info(
                "event=data_lease_retry job=%s generation=%d worker=%s code=%s detail=%s",
                self.job_id,
                generation,
                self.worker_id,
                exc.code().name,
                exc.details(),
            )
            time.sleep(RETRY_S)
            return None
        self._finished = []  # the controller has them
        if reply.wait:
            time.sleep(reply.retry_after_ms / 1000)
            return None
        self._range = (reply.range.start, reply.range.end)
        self._at = reply.range.start
        log.info(
            "event=data_leased job=%s generation=%d worker=%s epoch=%d range=%d-%d",
            self.job_id,
            generation,
            self.worker_id,
            reply.epoch,
            reply.range.start,
            reply.range.end,
        )
        return self._at

    def done(self, index: int) -> None:
        """``index`` is applied (or was already) on every shard."""
        if self._range is not None and index == self._at:
            self._at += 1

    def reset(self) -> None:
        """Forget the range: the job was restored, and the controller rebuilt its queue."""
        self._range, self._finished = None, []
