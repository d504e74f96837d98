"""LeaseData: the controller's thin side of :mod:`.data_leases`.

The queues live in the leading controller's memory, never in etcd: a lease is
handed out every ``data.shard_batches`` batches, and nothing may be written
to etcd at the pace of training (ARCHITECTURE invariant 1), nor may training
stop while etcd is away. They need no durability of their own, because the
PS tier holds the truth: every shard knows the batches it applied. A queue
is (re)built from the shards' applied sets whenever this controller has none
for the job, or has one from before a restore or a switch (its ``origin``):
every batch below the highest any shard applied that not every shard applied
is leased again, and the rest goes on from there. A range that a worker
still holds from a former leader is thereby handed out twice, and the shards
refuse whichever copy of each batch comes second.
"""

from __future__ import annotations

import logging
import threading

from elasticd.batches import BatchSet
from elasticd.ps_client import PSTier
from elasticd.rpc import job_pb2
from elasticd.server.controller.data_leases import WAIT_MS, DataQueue, lease, rebuilt
from elasticd.server.controller.planning import JobSnapshot

log = logging.getLogger(__name__)


class NotLeasable(Exception):
    """The asking worker may not lease data now (not a member, not ps-async, no PS tier)."""


def tier_batches(controller, snap: JobSnapshot) -> tuple[BatchSet, int]:
    """The batches every live shard of the job applied, and one past the highest any applied."""
    if snap.placement is None or snap.generation is None:
        raise NotLeasable(f"job {snap.record.job_id} has no PS tier yet")
    cluster = controller.view.cluster()
    tier = PSTier(snap.record.job_id, snap.generation.number, snap.placement, cluster.ps)
    try:
        infos = tier.info()
    except Exception as exc:  # a PS that does not answer: the worker asks again
        raise NotLeasable(
            f"the PS tier of job {snap.record.job_id} does not answer: {exc}"
        ) from exc
    finally:
        tier.close()
    sets = [BatchSet.from_flat(list(i.applied)) for i in infos.values()]
    common = sets[0]
    for other in sets[1:]:
        common = common.intersection(other)
    return common, max(s.end() for s in sets)


class DataQueues:
    """Each ps-async job's queue, kept while this controller leads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, DataQueue] = {}

    def forget(self) -> None:
        """Leadership lost (or gained): the next leases start from the PS tier."""
        with self._lock:
            self._queues.clear()

    def lease(self, controller, request: job_pb2.DataLeaseRequest) -> job_pb2.DataLease:
        # Not only the leader: a controller cut off from etcd (which cannot know
        # whether it still leads) goes on handing out ranges, so training does not
        # stop with etcd. Two controllers leasing at once cost duplicates, which
        # the shards refuse, never a lost batch: a range is finished only applied.
        snap = controller.snapshot(request.job_id)  # JobNotFound for an unknown job
        gen, record, data = snap.generation, snap.record, snap.spec.data
        if record.mode != "ps-async":
            raise NotLeasable(f"job {request.job_id} trains in {record.mode}, not ps-async")
        members = frozenset(m.worker_id for m in gen.members) if gen is not None else frozenset()
        if request.worker_id not in members:
            raise NotLeasable(
                f"worker {request.worker_id!r} is not a member of generation "
                f"{gen.number if gen is not None else 0} of job {request.job_id} (asked as "
                f"generation {request.generation}): wait for its new assignment"
            )
        origin = (record.restored_generation, record.switches_done)
        with self._lock:
            q = self._queues.get(request.job_id)
        if q is None or q.origin != origin:
            done, next_ = tier_batches(controller, snap)  # outside the lock: RPCs to the PS
            next_ = max(next_, request.start_hint)
            fresh = rebuilt(data.shard_batches, data.epoch_batches, origin, done, next_)
            with self._lock:
                q = self._queues.get(request.job_id)
                if q is None or q.origin != origin:
                    q = self._queues[request.job_id] = fresh
                    log.info(
                        "event=data_queue_started job=%s origin=%s next=%d requeued=%s",
                        request.job_id,
                        origin,
                        q.next,
                        list(q.requeued),
                    )
        with self._lock:
            q = self._queues[request.job_id]
            decision = lease(
                q,
                holder=request.holder,
                worker=request.worker_id,
                finished=[(r.start, r.end) for r in request.finished],
                members=members,
            )
            self._queues[request.job_id] = decision.queue
        if decision.queue.reclaimed != q.reclaimed:
            log.info(
                "event=data_reclaimed job=%s generation=%d worker=%s requeued=%s",
                request.job_id,
                gen.number,
                request.worker_id,
                list(q.requeued)
                + [(x.start, x.end) for x in q.leases if x not in decision.queue.leases],
            )
        if decision.lease is None:
            return job_pb2.DataLease(wait=True, retry_after_ms=WAIT_MS, epoch=decision.epoch)
        x = decision.lease
        return job_pb2.DataLease(
            range=job_pb2.BatchRange(start=x.start, end=x.end), epoch=decision.epoch
        )

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._queues.pop(job_id, None)
