"""Adoption: a new leader takes over a running generation without sealing a new one.

The workers of a running generation report to the controller named in their
assignments. A new leader rewrites each assignment of that generation with its
own address (same generation, members and placement), so the workers carry on
and report to it. The controller writes these ops conditionally on the
generation as it read it (:class:`.writes.JobWriter`), so an adoption can never
bring back a generation that a seal has replaced.
"""

from __future__ import annotations

from elasticd.coord.etcd import Put
from elasticd.coord.keys import Keys
from elasticd.security.job_credentials import NO_CREDENTIALS, JobMinter
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot
from elasticd.server.controller.sealing import assignment


def adoption_ops(
    snap: JobSnapshot,
    cluster: ClusterSnapshot,
    keys: Keys,
    controller: str,
    checkpoint_root: str = "",
    mint: JobMinter = NO_CREDENTIALS,
) -> list[Put]:
    """The writes that point every node of ``snap``'s generation at ``controller``."""
    gen = snap.generation
    if gen is None:
        return []
    return [
        Put(
            keys.assignment(node, snap.record.job_id),
            assignment(
                snap, gen, snap.placement, cluster, node, controller, checkpoint_root, mint=mint
            ),
        )
        for node in gen.nodes
    ]
