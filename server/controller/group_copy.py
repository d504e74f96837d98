"""Copying slice groups between PS servers in the seal of a generation.

PS failover (:mod:`.failover`) and PS drain (:mod:`.ps_drain`) decide, each
with its own pure function, which groups get a copy on which PS; both then
apply the copies the same way, here, before the generation N is sealed:

1. each group is exported from its primary at N, which fences the primary
   (no push of generation N-1 lands there after the copy), and imported on
   its target at the same version, with its optimizer state and its record
   of applied batches, as a backup or as the new primary;
2. every primary is told where its backup is (ConfigureShard at N).

Every step is idempotent (an import replaces, a configure sets), so a
controller that dies halfway, or a PS that does not answer, makes the next
pass repeat it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence

import grpc

from elasticd.jobspec import JobSpec
from elasticd.membership import Generation
from elasticd.placement import Copy, ShardPlacement
from elasticd.ps_errors import PSUnavailable
from elasticd.ps_state import import_bytes
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.rpc.limits import GRPC_OPTIONS
from elasticd.security.channels import open_channel
from elasticd.server.controller.planning import JobSnapshot

log = logging.getLogger(__name__)

COPY_TIMEOUT_S = 120.0  # one group exported or imported whole
CONTROL_TIMEOUT_S = 5.0

# Told of each group copied: (the copy, imported as a backup, version, bytes).
Copied = Callable[[Copy, bool, int, int], None]


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


def copy_groups(
    what: str,
    snap: JobSnapshot,
    gen: Generation,
    placement: ShardPlacement,
    copies: Sequence[tuple[Copy, bool]],
    addresses: Mapping[str, str],
    copied: Copied,
) -> None:
    """Make ``placement`` true for generation ``gen``: apply each of ``copies`` (a group
    copy, and whether it lands as a backup) in order, telling ``copied`` of each one
    done, then point every primary at its backup.

    Raises PSUnavailable, naming ``what`` ("failover", "drain") and the job, when a
    PS does not answer (the next pass tries again).
    """
    job_id = snap.record.job_id
    try:
        for copy, backup in copies:
            done = copy_group(snap.spec, job_id, gen, placement, copy, addresses, backup)
            if done is not None:
                copied(copy, backup, *done)
        configure_backups(job_id, gen.number, placement, addresses)
    except grpc.RpcError as exc:
        raise PSUnavailable(f"{what} of job {job_id}: {exc.code().name}: {exc.details()}") from None
