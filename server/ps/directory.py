"""The shards one PS process holds, and the ones it refuses to create.

A PS is a cache of state that exists nowhere else until it is checkpointed, so
the dangerous request is not a malformed one but a well-formed InitShard that
arrives at the wrong moment: after the PS restarted and lost a job's slices,
or after the job's shard was dropped, or from a generation the controller
has already fenced off. Any of them would silently start part of a model
from a fresh initialisation. This module decides, in plain Python, whether a
shard may be created, and keeps per job the generation floor the controller
set even when no shard is held here.

* **Incarnation.** Each PS process draws a boot id when it starts and
  registers it in etcd. The controller records the boot id of every PS in
  the job's placement, and workers send it with InitShard. A PS whose boot
  id differs has restarted since: it refuses, and the controller (which sees
  the new boot id in etcd) decides what happens to the job.
* **Floors.** AdvanceGeneration for a job this PS holds no shard of, and
  DropShard, leave a floor: InitShard from an older generation, or for a
  dropped job, is refused.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

from elasticd.server.ps.shard import ParameterShard, ShardError, StaleGeneration

MAX_FLOORS = 4096  # jobs whose floor is remembered without a shard; oldest forgotten first
DROPPED = 1 << 62  # the floor of a job whose shard was dropped: no generation passes it


class ShardRefused(ShardError):
    """InitShard would re-create slices this PS lost or dropped; only the controller may."""


def new_incarnation() -> str:
    return uuid.uuid4().hex[:16]


class ShardDirectory:
    def __init__(self, ps_id: str, incarnation: str = "", max_floors: int = MAX_FLOORS) -> None:
        self.ps_id = ps_id
        self.incarnation = incarnation or new_incarnation()
        self._shards: dict[tuple[str, str], ParameterShard] = {}  # (job, group) -> shard
        self._floors: OrderedDict[str, int] = OrderedDict()
        self._max_floors = max_floors
        self._lock = threading.Lock()

    def get(self, job_id: str, group: str = "") -> ParameterShard | None:
        with self._lock:
            return self._shards.get((job_id, group))

    def of_job(self, job_id: str) -> list[tuple[str, ParameterShard]]:
        """(group, shard) of every group of ``job_id`` held here."""
        with self._lock:
            return sorted((g, s) for (j, g), s in self._shards.items() if j == job_id)

    def items(self) -> list[tuple[tuple[str, str], ParameterShard]]:
        with self._lock:
            return sorted(self._shards.items(), key=lambda kv: kv[0])

    def check_create(self, job_id: str, generation: int, incarnation: str) -> None:
        """Raise unless a worker may create ``job_id``'s shard here now."""
        if incarnation and incarnation != self.incarnation:
            raise ShardRefused(
                f"ps {self.ps_id} restarted since job {job_id} was placed on it (boot id "
                f"{self.incarnation}, the placement names {incarnation}): it holds none of the "
                "job's slices and will not re-create them from a fresh model; the controller "
                "restores them or moves the job"
            )
        with self._lock:
            # A group the job does not have here yet is created at no generation older
            # than the floor, nor than any group of the job this PS holds.
            held = [s.generation for (j, _), s in self._shards.items() if j == job_id]
            floor = max([self._floors.get(job_id, 0), *held])
        if floor >= DROPPED:
            raise ShardRefused(
                f"ps {self.ps_id} dropped job {job_id}'s shard when the job ended; "
                "it is not created again"
            )
        if generation < floor:
            raise StaleGeneration(
                f"job {job_id}: generation {generation} is stale, the job is at generation {floor}"
            )

    def add(self, job_id: str, group: str, shard: ParameterShard) -> ParameterShard:
        """Keep ``shard`` unless one exists already; returns the one kept."""
        with self._lock:
            return self._shards.setdefault((job_id, group), shard)

    def replace(self, job_id: str, group: str, shard: ParameterShard) -> None:
        """Install an imported shard, unless a newer generation's shard is already here."""
        with self._lock:
            floor = self._floors.get(job_id, 0)
            if floor >= DROPPED:
                raise ShardRefused(
                    f"ps {self.ps_id} dropped job {job_id}'s shards when the job ended; "
                    "a late import does not bring them back"
                )
            if shard.generation < floor:
                raise StaleGeneration(
                    f"job {job_id}: generation {shard.generation} is stale, "
                    f"the job is at generation {floor}"
                )
            current = self._shards.get((job_id, group))
            if current is not None and current.generation > shard.generation:
                raise StaleGeneration(
                    f"job {job_id}: generation {shard.generation} is stale, "
                    f"the job is at generation {current.generation}"
                )
            self._shards[(job_id, group)] = shard
            self._floors.pop(job_id, None)

    def raise_floor(self, job_id: str, generation: int) -> None:
        """Remember that ``generation`` is current for a job without a shard here."""
        with self._lock:
            if any(j == job_id for j, _ in self._shards):
                return
            self._floors[job_id] = max(self._floors.get(job_id, 0), generation)
            self._floors.move_to_end(job_id)
            while len(self._floors) > self._max_floors:
                self._floors.popitem(last=False)

    def drop(self, job_id: str) -> list[ParameterShard]:
        """Forget every group of ``job_id``; no worker may create one again."""
        with self._lock:
            dropped = [self._shards.pop(k) for k in [k for k in self._shards if k[0] == job_id]]
            self._floors[job_id] = DROPPED
            self._floors.move_to_end(job_id)
            while len(self._floors) > self._max_floors:
                self._floors.popitem(last=False)
            return dropped
