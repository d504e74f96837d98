"""Failing a job's PS tier over from memory: hot replicas take over a lost PS.

With ``ps.replicas: 2`` every slice group lives on two PS servers. When one
of them is lost (its lease expired, or it came back under a new boot id and
holds nothing), the controller, in the seal of the next generation N:

1. computes the new placement (:func:`elasticd.placement.failover`, a pure
   function): each group keeps a live copy as its primary, the backup taking
   over for a lost primary; a group left without a backup gets a new one on
   the live PS that holds the fewest bytes;
2. fills each new backup: exports the group from its primary at generation N
   (which fences the primary: no push of generation N-1 lands there after
   the copy) and imports it as a backup at the same version;
3. tells every primary where its backup is (ConfigureShard at N), and only
   then seals N, so no worker pushes to a primary before its backup exists.

Steps 2 and 3 are :func:`.group_copy.copy_groups`, which a PS drain applies too.

No acknowledged update is lost: a push is acknowledged only once both copies
applied it. Every step is idempotent (an import replaces, a configure sets),
so a controller that dies halfway repeats it on the next pass. When some
group has no live copy at all, the job is restored from its checkpoint
instead (:mod:`elasticd.server.controller.restore`).
"""

from __future__ import annotations

import logging

from elasticd.membership import Generation
from elasticd.placement import Copy, ShardPlacement
from elasticd.server.controller.group_copy import copy_groups
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot, planned_failover

log = logging.getLogger(__name__)


def fail_over(
    snap: JobSnapshot, cluster: ClusterSnapshot, gen: Generation
) -> tuple[ShardPlacement, str] | None:
    """Move the job's groups to live copies for generation ``gen``: (placement, what moved).

    None when some group has no live copy (restore from a checkpoint instead).
    Raises PSUnavailable when a PS does not answer (the next pass tries again).
    """
    if snap.record.restore_pending > snap.record.restored_generation:
        return None  # a restore from a checkpoint began: it is finished first
    plan = planned_failover(snap, cluster)
    if plan is None:
        return None
    placement, copies = plan
    job_id = snap.record.job_id

    def filled(copy: Copy, _backup: bool, version: int, size: int) -> None:
        log.info(
            "event=backup_filled job=%s generation=%d group=%s from=%s to=%s version=%d bytes=%d",
            job_id,
            gen.number,
            copy.group,
            copy.source,
            copy.target,
            version,
            size,
        )

    copy_groups("failover", snap, gen, placement, [(c, True) for c in copies], cluster.ps, filled)
    old = snap.placement
    promoted = sorted(g for g in placement.groups if placement.holders(g)[0] != old.holders(g)[0])
    summary = (
        f"failover: groups {','.join(promoted) or '-'} served by their backups; new backups "
        f"{','.join(f'{c.group}->{c.target}' for c in copies) or '-'}"
    )
    log.info(
        "event=failed_over job=%s generation=%d promoted=%s copies=%d bytes_per_ps=%s",
        job_id,
        gen.number,
        promoted,
        len(copies),
        placement.bytes_per_ps(),
    )
    return placement, summary
