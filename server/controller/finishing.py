"""Ending a job: a terminal record and no assignments, then the shards are released.

The terminal write is conditional like every other (see :mod:`.writes`), so a
job ends once. Shards are dropped afterwards, PS by PS: a dead PS never
stops a cancel, and the shards on the PS that answer are freed. A drop
carries a generation above any a worker of the job can have, so it also
fences the job off on that PS for good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from elasticd.coord.etcd import Delete, Put
from elasticd.coord.keys import Keys
from elasticd.placement import ShardPlacement
from elasticd.ps_control import drop_shards
from elasticd.server.controller.planning import JobSnapshot
from elasticd.server.controller.records import JobRecord

log = logging.getLogger(__name__)

FINAL_GENERATION = 1 << 62  # a dropped job's fence: no worker generation reaches it


def final_record(snap: JobSnapshot, record: JobRecord) -> JobRecord:
    """``record`` with what the agents last reported of the final generation's workers:
    the agents withdraw their reports once the job has ended, the record keeps them."""
    number = snap.generation.number if snap.generation else -1
    members = snap.generation.worker_ids if snap.generation else frozenset()
    reports = {w: r for w, r in snap.workers.items() if w in members and r.generation == number}
    return record.evolve(
        final_workers={w: r.state for w, r in sorted(reports.items())},
        restarts=max([record.restarts, *(r.restarts for r in snap.workers.values())]),
    )


def finish_ops(snap: JobSnapshot, record: JobRecord, keys: Keys) -> list[Put | Delete]:
    job_id = record.job_id
    record = final_record(snap, record)
    ops: list[Put | Delete] = [
        Put(keys.job_status(job_id), record.evolve(updated_at=time.time()).to_json())
    ]
    if snap.generation:
        ops += [Delete(keys.assignment(n, job_id)) for n in snap.generation.nodes]
    return ops


def release_shards(
    job_id: str, placement: ShardPlacement | None, registered: Mapping[str, str]
) -> dict[str, str]:
    """Drop the job's shards on every registered PS, placed or not.

    A PS outside the final placement may still hold a stale copy: one that
    was cut off past its lease while the job was restored or failed over
    elsewhere, then came back. Returns the PS whose shard could not be
    dropped, with why. A placed PS that is not registered is listed too: if
    its process died, the shard went with it; if it is only cut off, it keeps
    the shard's memory until it restarts.
    """
    if placement is None:
        return {}
    missed = drop_shards(job_id, FINAL_GENERATION, dict(registered))
    missed.update({p: "not registered" for p in placement.ps_ids if p not in registered})
    if missed:
        log.warning("event=drop_shards_incomplete job=%s missed=%s", job_id, missed)
    return missed
