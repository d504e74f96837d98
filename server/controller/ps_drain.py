"""Moving a draining PS's groups to live PS servers before it exits.

A PS that receives SIGTERM marks its registration ``draining``
(server/ps/drain.py). The controller places nothing new on it, and for every
job with a copy of a group there (primary or backup) it seals a generation N
in which those copies live elsewhere (:func:`elasticd.placement.drain_moves`,
a pure function). Before the seal it

1. exports each moved group from its primary at generation N, which fences
   the primary: no push of generation N-1 lands there after the copy, and
   imports it on its new PS at the same version, with its optimizer state and
   its record of applied batches, as primary or as backup;
2. tells every primary where its backup is (ConfigureShard at N).

Both steps are :func:`.group_copy.copy_groups`, which a failover applies too.

After the seal it drops the job's shards from the draining PS, which then
holds nothing of the job and exits once it holds nothing at all. No update is
lost and none is read back from storage: the state moves over gRPC, whole.
"""

from __future__ import annotations

import logging

from elasticd.membership import Generation
from elasticd.placement import Copy, ShardPlacement
from elasticd.ps_control import drop_shards
from elasticd.server.controller.group_copy import copy_groups
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot, planned_drain

log = logging.getLogger(__name__)


def move_off_draining(
    snap: JobSnapshot, cluster: ClusterSnapshot, gen: Generation
) -> tuple[ShardPlacement, str] | None:
    """Move the job's copies off draining PS for generation ``gen``: (placement, what moved).

    None when nothing is to move, or it cannot (no other live PS). Raises
    PSUnavailable when a PS does not answer (the next pass tries again).
    """
    plan = planned_drain(snap, cluster)
    if plan is None:
        return None
    placement, moves = plan
    job_id = snap.record.job_id

    def moved(copy: Copy, backup: bool, version: int, size: int) -> None:
        log.info(
            "event=group_moved job=%s generation=%d group=%s from=%s to=%s backup=%s version=%d "
            "bytes=%d",
            job_id,
            gen.number,
            copy.group,
            copy.source,
            copy.target,
            backup,
            version,
            size,
        )

    copies = [(Copy(m.group, m.source, m.target), m.backup) for m in moves]
    copy_groups("drain", snap, gen, placement, copies, cluster.ps, moved)
    summary = "drain: groups " + ",".join(f"{m.group}->{m.target}" for m in moves)
    return placement, summary


def release_draining(
    job_id: str, placement: ShardPlacement, cluster: ClusterSnapshot, generation: int
) -> None:
    """Drop the job's shards from the draining PS that the sealed ``placement`` no longer names."""
    for ps_id in sorted(cluster.ps_draining & set(cluster.ps) - set(placement.ps_ids)):
        failed = drop_shards(job_id, generation, {ps_id: cluster.ps[ps_id]})
        log.info(
            "event=draining_ps_released job=%s ps=%s generation=%d failed=%s",
            job_id,
            ps_id,
            generation,
            failed or "-",
        )
