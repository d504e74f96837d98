"""Data shards for ps-async jobs: ranges of batch indices leased to workers.

ARCHITECTURE invariant 6. The controller hands out ranges of batch indices
(``data.shard_batches`` each) and takes back the unfinished ranges of a
worker that left the generation, or whose process restarted (its ``holder``
changed). A worker holds one range at a time: it returns the range as
finished when it asks for the next, and asking again without finishing gets
the same range back (an answer lost on the way costs nothing).

The queue does not know which batch of a range a dead holder applied: the
range is leased again whole, and the PS shards refuse the batches they have
applied already (each shard keeps its applied set; see server/ps/shard.py).
So across failures every batch is applied once. With ``data.epoch_batches``
the next epoch's batches are handed out only once every range of the current
epoch is finished; a worker that asks meanwhile is told to wait.

A restore from a checkpoint rolls the PS state back, and with it the applied
sets; the queue is then rebuilt from the restored shards' applied sets, so no
batch lost with the rolled-back state stays marked as done. ``origin`` names
the restore (or the switch into ps-async) the queue was built for.

Pure: :func:`lease` decides on a :class:`DataQueue` and returns the new one;
the leading controller keeps the queues in memory (:mod:`.data_service`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from elasticd.batches import BatchSet, Range

WAIT_MS = 200  # how long a worker told to wait sleeps before it asks again


@dataclass(frozen=True)
class Lease:
    holder: str
    worker: str
    start: int
    end: int


@dataclass(frozen=True)
class DataQueue:
    shard_batches: int
    epoch_batches: int = 0  # 0: one epoch that never ends
    next: int = 0  # the first batch never leased
    requeued: tuple[Range, ...] = ()  # handed back, leased again first, lowest first
    leases: tuple[Lease, ...] = ()
    origin: tuple[int, int] = (0, 0)  # (restored generation, switches done) it was built for
    reclaimed: int = field(default=0, compare=False)  # ranges taken back, for the logs

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "shard_batches": self.shard_batches,
                "epoch_batches": self.epoch_batches,
                "next": self.next,
                "requeued": [list(r) for r in self.requeued],
                "leases": [[x.holder, x.worker, x.start, x.end] for x in self.leases],
                "origin": list(self.origin),
                "reclaimed": self.reclaimed,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DataQueue:
        d = json.loads(data)
        return cls(
            shard_batches=int(d["shard_batches"]),
            epoch_batches=int(d["epoch_batches"]),
            next=int(d["next"]),
            requeued=tuple((int(s), int(e)) for s, e in d["requeued"]),
            leases=tuple(Lease(h, w, int(s), int(e)) for h, w, s, e in d["leases"]),
            origin=(int(d["origin"][0]), int(d["origin"][1])),
            reclaimed=int(d.get("reclaimed", 0)),
        )

    def epoch_of(self, index: int) -> int:
        return index // self.epoch_batches if self.epoch_batches else 0


def rebuilt(
    shard_batches: int, epoch_batches: int, origin: tuple[int, int], done: BatchSet, next_: int
) -> DataQueue:
    """A queue that starts from ``done`` (every batch below ``next_`` not in it is handed out)."""
    gaps = []
    for s, e in done.gaps(next_):
        gaps += [(a, min(a + shard_batches, e)) for a in range(s, e, shard_batches)]
    return DataQueue(shard_batches, epoch_batches, next_, tuple(gaps), (), origin)


def reclaim(q: DataQueue, members: frozenset[str], holder: str, worker: str) -> DataQueue:
    """Take back the ranges of workers not in ``members``, and of ``worker``'s earlier process."""
    kept, back = [], []
    for x in q.leases:
        gone = x.worker not in members or (x.worker == worker and x.holder != holder)
        (back if gone else kept).append(x)
    if not back:
        return q
    requeued = tuple(sorted([*q.requeued, *((x.start, x.end) for x in back)]))
    return replace(q, leases=tuple(kept), requeued=requeued, reclaimed=q.reclaimed + len(back))


@dataclass(frozen=True)
class LeaseDecision:
    queue: DataQueue
    lease: Lease | None  # None: wait
    epoch: int


def lease(
    q: DataQueue, *, holder: str, worker: str, finished: list[Range], members: frozenset[str]
) -> LeaseDecision:
    """The next range for ``worker``'s process ``holder``, after it finished ``finished``."""
    q = reclaim(q, members, holder, worker)
    mine = [x for x in q.leases if x.holder == holder]
    done = {(int(s), int(e)) for s, e in finished}
    still = [x for x in mine if (x.start, x.end) not in done]
    if len(still) != len(mine):
        q = replace(q, leases=tuple(x for x in q.leases if x not in mine or x in still))
    if still:
        return LeaseDecision(q, still[0], q.epoch_of(still[0].start))  # asked again: same range
    if q.requeued:
        (start, end), rest = q.requeued[0], q.requeued[1:]
        got = Lease(holder, worker, start, end)
        return LeaseDecision(
            replace(q, requeued=rest, leases=(*q.leases, got)), got, q.epoch_of(start)
        )
    epoch = q.epoch_of(q.next)
    if q.epoch_batches and q.next % q.epoch_batches == 0 and q.next > 0:
        # the epoch before ``next`` is complete only when nothing of it is leased
        if any(x.start < q.next for x in q.leases):
            return LeaseDecision(q, None, epoch - 1)
    end = q.next + q.shard_batches
    if q.epoch_batches:
        end = min(end, (epoch + 1) * q.epoch_batches)
    got = Lease(holder, worker, q.next, end)
    return LeaseDecision(replace(q, next=end, leases=(*q.leases, got)), got, epoch)
