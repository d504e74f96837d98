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

No acknowledged update is lost: a push is acknowledged only once both copies
applied it. Every step is idempotent (an import replaces, a configure sets),
so a controller that dies halfway repeats it on the next pass. When some
group has no live copy at all, the job is restored from its checkpoint
instead (:mod:`elasticd.server.controller.restore`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import grpc

from elasticd.jobspec import JobSpec
from elasticd.membership import Generation
from elasticd.placement import Copy, ShardPlacement
from elasticd.ps_errors import PSUnavailable
from elasticd.ps_state import import_bytes
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.rpc.limits import GRPC_OPTIONS
from elasticd.security.channels import open_channel
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot, planned_failover

log = logging.getLogger(__name__)

COPY_TIMEOUT_S = 120.0  # one group exported or imported whole
CONTROL_TIMEOUT_S = 5.0


def _group_header(
    spec: JobSpec, job_id: str, generation: int, workers: int, placement: ShardPlacement, group: str
) -> ps_pb2.InitShardHeader:
    return ps_pb2.InitShardHeader(
        fence=ps_pb2.Fence(job_id=job_id, generation=generation, shard=group),
        tensors=[
            ps_pb2.TensorMeta(key=s.key, dtype=s.dtype, shape=s.shape)
            for s in placement.in_group(group)
        ],
        optimizer=ps_pb2.OptimizerConfig(
            name=spec.optimizer.name, kwargs_json=json.dumps(spec.optimizer.kwargs)
        ),
        max_staleness=spec.ps.max_staleness,
        workers=workers,
        max_version=spec.steps,
        backup=True,
    )


def copy_group(
    spec: JobSpec,
    job_id: str,
    gen: Generation,
    placement: ShardPlacement,
    copy: Copy,
    addresses: Mapping[str, str],
    backup: bool = True,
) -> tuple[int, int] | None:
    """Export ``copy.group`` from its primary at ``gen`` (fencing it) and import it on
    ``copy.target`` as a backup or a primary: (version, bytes), or None when the
    group was never created (the job had not trained yet: workers create it)."""
    fence = ps_pb2.Fence(job_id=job_id, generation=gen.number, shard=copy.group)
    with open_channel(addresses[copy.source], options=GRPC_OPTIONS) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        try:
            data = b"".join(
                r.data
                for r in stub.ExportShard(
                    ps_pb2.ExportShardRequest(fence=fence), timeout=COPY_TIMEOUT_S
                )
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.info(
                "event=group_not_copied job=%s group=%s reason=no shard yet", job_id, copy.group
            )
            return None
        # Fenced at gen.number by the export: nothing changes the primary until the seal.
        info = stub.ShardInfo(
            ps_pb2.ShardInfoRequest(job_id=job_id, shard=copy.group), timeout=CONTROL_TIMEOUT_S
        )
    header = _group_header(spec, job_id, gen.number, gen.world_size, placement, copy.group)
    header.backup = backup
    with open_channel(addresses[copy.target], options=GRPC_OPTIONS) as channel:
        import_bytes(ps_pb2_grpc.ParameterServerStub(channel), header, info.version, data)
    return info.version, len(data)


def _fill_backup(
    spec: JobSpec,
    job_id: str,
    gen: Generation,
    plan: tuple[ShardPlacement, Mapping[str, str]],
    copy: Copy,
) -> None:
    placement, addresses = plan
    copied = copy_group(spec, job_id, gen, placement, copy, addresses)
    if copied is None:
        return
    log.info(
        "event=backup_filled job=%s generation=%d group=%s from=%s to=%s version=%d bytes=%d",
        job_id,
        gen.number,
        copy.group,
        copy.source,
        copy.target,
        *copied,
    )


def configure_backups(
    job_id: str, generation: int, placement: ShardPlacement, addresses: Mapping[str, str]
) -> None:
    for group in placement.groups:
        primary, backup = placement.holders(group)
        request = ps_pb2.ConfigureShardRequest(
            fence=ps_pb2.Fence(job_id=job_id, generation=generation, shard=group),
            backup=False,
            backup_address=addresses[backup] if backup else "",
        )
        with open_channel(addresses[primary], options=GRPC_OPTIONS) as channel:
            try:
                ps_pb2_grpc.ParameterServerStub(channel).ConfigureShard(
                    request, timeout=CONTROL_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # not created yet: workers will
                    raise


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
    try:
        for c in copies:
            _fill_backup(snap.spec, job_id, gen, (placement, cluster.ps), c)
        configure_backups(job_id, gen.number, placement, cluster.ps)
    except grpc.RpcError as exc:
        raise PSUnavailable(
            f"failover of job {job_id}: {exc.code().name}: {exc.details()}"
        ) from None
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
