"""Sealing a generation: fence the PS tier first, then one conditional transaction.

What invariant 3 promises, exactly: once generation N+1 of a job is visible
in etcd, every parameter server that holds (or will hold) a shard of the job
refuses generation N and older. The controller keeps that promise by
ordering: it raises the fence of every registered PS of the placement to
N+1 and waits for each to acknowledge, and only then commits the seal. A PS
that does not answer is asked again until its lease expires (then it is
gone, and the job waits for it); the seal is not committed meanwhile. If
the commit then loses (the job changed, or leadership moved), the PS tier
is fenced at a generation that the next successful seal will carry anyway,
since generation numbers only ever go up by one.

Which workers, which ranks and which placement are plain functions of the
snapshot; only :func:`fence_tier` and the commit touch the world.
:func:`seal` applies a Seal decision (:func:`.planning.decide`) in that order,
with the PS tier's state moved first when the seal restores it: off a
draining PS (:mod:`.ps_drain`), to hot replicas (:mod:`.failover`), or from
a checkpoint (:mod:`.restore`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from elasticd.coord.etcd import Delete, Put
from elasticd.coord.keys import Keys
from elasticd.membership import Generation, assign_ranks
from elasticd.placement import ShardPlacement, TensorSpec, place
from elasticd.ps_control import advance_fence
from elasticd.retry import Backoff
from elasticd.security.job_credentials import NO_CREDENTIALS, JobMinter
from elasticd.server.controller.errors import FenceIncomplete
from elasticd.server.controller.failover import fail_over
from elasticd.server.controller.planning import (
    READY,
    RESTARTING,
    ClusterSnapshot,
    JobSnapshot,
    Seal,
    master_port,
)
from elasticd.server.controller.ps_drain import move_off_draining, release_draining
from elasticd.server.controller.records import RUNNING, WAITING, JobRecord
from elasticd.server.controller.restore import restore_in_seal

if TYPE_CHECKING:
    from elasticd.server.controller.controller import Controller

log = logging.getLogger(__name__)

FENCE_TIMEOUT_S = 15.0  # how long a seal waits for every PS to acknowledge its fence
FENCE_RPC_TIMEOUT_S = 2.0  # one AdvanceGeneration to one PS


def next_generation(snap: JobSnapshot, action: Seal) -> Generation:
    number = snap.generation.number if snap.generation else 0
    return assign_ranks(snap.record.job_id, number + 1, action.workers)


def placement_for_seal(
    snap: JobSnapshot, cluster: ClusterSnapshot, tensors: Callable[[], list[TensorSpec]]
) -> ShardPlacement | None:
    """The job's placement: the existing one, or (ps-async) a new one on the live PS tier."""
    if snap.placement is not None or snap.record.mode != "ps-async":
        return snap.placement  # an allreduce job keeps its placement for a switch back
    servers = cluster.ps_open or sorted(cluster.ps)  # a draining PS takes nothing new
    return place(tensors(), servers, replicas=snap.spec.ps.replicas).with_incarnations(
        cluster.ps_incarnations
    )


def assignment(
    snap: JobSnapshot,
    gen: Generation,
    placement: ShardPlacement | None,
    cluster: ClusterSnapshot,
    node_id: str,
    controller: str,
    checkpoint_root: str = "",
    standby: tuple[str, ...] = (),
    mint: JobMinter = NO_CREDENTIALS,
) -> bytes:
    """What ``node_id``'s agent must run for the job in generation ``gen``; ``standby``:
    its replacements that are starting, kept running to join a later generation. Each of
    its workers gets a job credential from ``mint`` (none on an open cluster)."""
    rank0 = gen.members[0].node_id if gen.members else node_id
    ranks = {w: -1 for w in standby} | {m.worker_id: m.rank for m in gen.on_node(node_id)}
    node = cluster.nodes.get(rank0)
    ps = {p: cluster.ps[p] for p in placement.ps_ids if p in cluster.ps} if placement else {}
    return json.dumps(
        {
            "job_id": snap.record.job_id,
            "generation": gen.number,
            "world_size": gen.world_size,
            "members": [m.__dict__ for m in gen.on_node(node_id)],
            "all_members": [m.__dict__ for m in gen.members],
            "master_addr": (node.address or node.hostname) if node else "",
            "master_port": master_port(snap.spec, snap.record.job_id, gen.number),
            "spec": {**snap.spec.to_dict(), "mode": snap.record.mode},
            "placement": json.loads(placement.to_json()) if placement else None,
            "ps": ps,
            "controller": controller,
            "standby": list(standby),
            # where the data stream starts again after a restore from a checkpoint
            "resume": {
                "generation": snap.record.restored_generation,
                "position": snap.record.restored_step,
            },
            # allreduce ranks write their checkpoint slices here, and a group without
            # state starts from the newest checkpoint there (else from resume_from)
            "checkpoint": {
                "url": snap.spec.checkpoint.url or checkpoint_root,
                "resume_from": snap.record.resume_from,
            },
            # each process gets only its own (the agent sees to that)
            "credentials": mint(snap.record.job_id, gen.number, ranks),
        }
    ).encode()


def seal_ops(
    snap: JobSnapshot,
    cluster: ClusterSnapshot,
    gen: Generation,
    placement: ShardPlacement | None,
    record: JobRecord,
    keys: Keys,
    controller: str,
    checkpoint_root: str = "",
    mint: JobMinter = NO_CREDENTIALS,
) -> list[Put | Delete]:
    """The writes of one seal: generation, record, placement, every node's assignment."""
    job_id = snap.record.job_id
    ops: list[Put | Delete] = [
        Put(keys.generation(job_id), gen.to_json()),
        Put(keys.job_status(job_id), record.to_json()),
    ]
    if placement is not None and placement != snap.placement:
        ops.append(Put(keys.placement(job_id), placement.to_json().encode()))
    sealed = replace(snap, record=record)  # assignments follow the record as sealed
    draining = frozenset(n for n, info in cluster.nodes.items() if info.draining)
    waiting = standby_workers(snap, gen, draining)
    nodes = set(gen.nodes) | set(waiting)
    for node in sorted(nodes):
        ops.append(
            Put(
                keys.assignment(node, job_id),
                assignment(
                    sealed,
                    gen,
                    placement,
                    cluster,
                    node,
                    controller,
                    checkpoint_root,
                    standby=waiting.get(node, ()),
                    mint=mint,
                ),
            )
        )
    old_nodes = set(snap.generation.nodes) if snap.generation else set()
    ops += [Delete(keys.assignment(node, job_id)) for node in old_nodes - nodes]
    return ops


def standby_workers(
    snap: JobSnapshot, gen: Generation, draining: frozenset[str] = frozenset()
) -> dict[str, tuple[str, ...]]:
    """Per node, the job's workers kept running outside ``gen``: replacements that are
    starting or ready; and, when an allreduce job falls below ``workers.min`` (``gen``
    is empty), its running processes too, which hold the only copy of its replica.
    None on a ``draining`` node: its agent leaves once it holds no process."""
    waiting = {RESTARTING, READY}
    if not gen.members and snap.record.mode == "allreduce":
        waiting.add(RUNNING)
    out: dict[str, list[str]] = {}
    for w, r in sorted(snap.workers.items()):
        if r.state in waiting and w not in gen.worker_ids and r.node_id not in draining:
            out.setdefault(r.node_id, []).append(w)
    return {node: tuple(ws) for node, ws in out.items()}


def sealed_record(snap: JobSnapshot, gen: Generation, reason: str) -> JobRecord:
    return snap.record.evolve(
        state=RUNNING if gen.members else WAITING,
        generation=gen.number,
        message=reason,
        updated_at=time.time(),
    )


def fence_tier(
    job_id: str,
    gen: Generation,
    placement: ShardPlacement,
    registered: Callable[[], Mapping[str, str]],
    timeout: float = FENCE_TIMEOUT_S,
) -> None:
    """Raise the fence of every registered PS of ``placement`` to ``gen``.

    Asks again until each acknowledges or is no longer registered. Raises
    FenceIncomplete when ``timeout`` passes first.
    """
    backoff = Backoff(initial=0.05, maximum=1.0, deadline=timeout)
    while True:
        live = registered()
        addresses = {p: live[p] for p in placement.ps_ids if p in live}
        missed = advance_fence(
            job_id, gen.number, gen.world_size, addresses, timeout=FENCE_RPC_TIMEOUT_S
        )
        if not missed:
            return
        log.info(
            "event=fence_retry job=%s generation=%d missed=%s", job_id, gen.number, sorted(missed)
        )
        if not backoff.sleep():
            raise FenceIncomplete(
                f"job {job_id}: parameter servers {sorted(missed)} did not acknowledge "
                f"generation {gen.number} in {timeout:g}s: {missed}"
            )


def log_sealed(
    snap: JobSnapshot, gen: Generation, placement: ShardPlacement | None, revision: int, reason: str
) -> None:
    log.info(
        "event=generation_sealed job=%s generation=%d world=%d revision=%d %s",
        snap.record.job_id,
        gen.number,
        gen.world_size,
        revision,
        reason,
    )
    if placement is not None and placement != snap.placement:
        log.info(
            "event=placed job=%s slices=%d bytes_per_ps=%s incarnations=%s",
            snap.record.job_id,
            len(placement.slices),
            placement.bytes_per_ps(),
            dict(placement.incarnations),
        )


def is_recovery(snap: JobSnapshot, action: Seal) -> bool:
    """Whether ``action`` replaces a generation that trained and lost a member, its PS
    state, or (a script job) a process: the job stands still until the new one steps."""
    current = snap.generation.worker_ids if snap.generation is not None else frozenset()
    if not current:
        return False
    lost = bool(current - set(action.workers))
    return lost or action.restore or action.reason.startswith("restart after failure")


def seal(controller: Controller, snap: JobSnapshot, cluster: ClusterSnapshot, action: Seal) -> None:
    """Seal the generation ``action`` asks for: the PS tier's state moved first when it
    restores (drain, failover, or a checkpoint), the tier fenced, then one transaction."""
    job_id = snap.record.job_id
    seen = time.time()
    gen = next_generation(snap, action)
    record = sealed_record(snap, gen, action.reason)
    restored = False
    drained = move_off_draining(snap, cluster, gen) if action.restore else None
    moved = drained or (fail_over(snap, cluster, gen) if action.restore else None)
    if moved is not None:  # hot replicas took over: nothing is read from storage
        placement, summary = moved
        record = record.evolve(message=f"{action.reason}; {summary}")
    elif action.restore:
        # The import at the new generation fences every PS of the new placement.
        done = restore_in_seal(controller, snap, cluster, gen, record, action.reason)
        if done is None:
            return
        snap, placement, record = done
        restored = True
    else:
        placement = placement_for_seal(snap, cluster, lambda: controller.shapes.of(snap))
    if placement is not None and not restored:
        # Invariant 3: the PS tier refuses the old generation before the new one exists.
        fence_tier(job_id, gen, placement, controller.registered_ps)
    ops = seal_ops(
        snap,
        cluster,
        gen,
        placement,
        record,
        controller.keys,
        controller.address,
        controller.checkpoint_url,
        controller.mint,
    )
    revision = controller.writer.update(snap, ops, generation=True)
    controller.adopted.add(job_id)
    if drained is not None:
        release_draining(job_id, drained[0], cluster, gen.number)
    log_sealed(snap, gen, placement, revision, action.reason)
    if gen.members and is_recovery(snap, action):
        controller.figures.recovery_began(job_id, gen.number, seen)
