"""The PS RPCs that move a whole shard: snapshots, exports, imports, and the
hot-replica pair (Replicate from a primary, ConfigureShard from the controller).

A mixin of :class:`elasticd.server.ps.service.ParameterServerServicer`, kept
apart so that the servicer's module stays about serving pushes and pulls.
"""

from __future__ import annotations

import logging

import grpc

from elasticd.checkpoint import CheckpointError, CorruptShard, ShardRecord
from elasticd.checkpoint.manifest import check_name, check_step
from elasticd.checkpoint.serialize import state_digest
from elasticd.checkpoint.store import CheckpointStore
from elasticd.rpc import ps_pb2
from elasticd.server.ps.messages import chunks_of, shard_header
from elasticd.server.ps.replication import BackupLink
from elasticd.server.ps.rules import forwarded_contributors
from elasticd.server.ps.shard import ParameterShard, ShardError
from elasticd.server.ps.transfer import export_shard, import_shard
from elasticd.wire import CHUNK_BYTES, Assembler, WireError

log = logging.getLogger(__name__)


def _import_limit(headers) -> int:
    """The most bytes a shard of these slices may take: parameters and optimizer state."""
    return 2 * (2 * sum(h.nbytes for h in headers) + (1 << 20))


def _snapshot_store(request: ps_pb2.SnapshotRequest, context) -> CheckpointStore:
    """The store a snapshot goes to, once its url, name and step are known to be usable.

    An empty url would be the PS's working directory: refused, as is a url no
    fsspec backend knows, a name that is not a file name and a negative step.
    """
    if not request.url:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "url: name the checkpoint store")
    try:
        check_name("name", request.name)
        check_name("fence.job_id", request.fence.job_id)
        check_step("step", request.step)
        return CheckpointStore(request.url)
    except (CheckpointError, ValueError, ImportError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"snapshot: {exc}")


class ShardStateRPCs:
    @staticmethod
    def _role(
        shard: ParameterShard,
        fence: ps_pb2.Fence,
        backup: bool,
        address: str,
    ) -> None:
        """Make ``shard`` a backup, or a primary forwarding to ``address`` ("": none)."""
        old = shard.forward
        link = BackupLink(fence.job_id, fence.shard, address) if address and not backup else None
        try:
            shard.configure(fence.generation, backup, link, address)
        except ShardError:
            if link is not None:
                link.close()
            raise
        if isinstance(old, BackupLink):
            old.close()

    def Snapshot(self, request, context):
        shard = self._of(request.fence, context)
        store = _snapshot_store(request, context)  # refused before the shard lock is taken
        try:
            data, version, applied = export_shard(shard, request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        try:
            record = store.write_shard(request.fence.job_id, request.step, request.name, data)
        except OSError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"checkpoint store {request.url}: {exc}")
        log.info(
            "event=shard_snapshot ps=%s job=%s step=%d version=%d bytes=%d",
            self.ps_id,
            request.fence.job_id,
            request.step,
            version,
            record.size,
        )
        return ps_pb2.SnapshotReply(
            path=record.path,
            sha256=record.sha256,
            size=record.size,
            version=version,
            applied=applied.flat(),
        )

    def ExportShard(self, request, context):
        shard = self._of(request.fence, context)
        try:
            data, _, _ = export_shard(shard, request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        shard.stats.sent(len(data))
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            yield ps_pb2.ShardBytes(data=bytes(view[offset : offset + CHUNK_BYTES]))

    def ImportShard(self, request_iterator, context):
        first = self._first(request_iterator, context, "ImportShard")
        headers, config = shard_header(first.shard, context)
        limit = _import_limit(headers)
        buf = bytearray()
        for req in request_iterator:
            if not req.HasField("bytes"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only bytes may follow the header")
            buf += req.bytes.data
            if len(buf) > limit:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "import larger than its slices need"
                )
        return self._install(first, headers, config, bytes(buf), context)

    def RestoreShard(self, request, context):
        headers, config = shard_header(request.header.shard, context)
        try:
            record = ShardRecord(request.name, request.path, request.sha256, request.size)
            store = CheckpointStore(request.url)
        except (CheckpointError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"shard record: {exc}")
        if record.size > _import_limit(headers):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "shard larger than its slices need")
        try:
            data = store.read_record(request.job_id, request.step, record)
        except CorruptShard as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        except (CheckpointError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"shard record: {exc}")
        except OSError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"checkpoint store: {exc}")
        return self._install(request.header, headers, config, data, context)

    def _install(self, first, headers, config, data: bytes, context):
        """Make ``data`` (an encoded shard) the job's shard for the group ``first`` names."""
        header, version = first.shard, first.version
        job_id, group = header.fence.job_id, self.group_of(header.fence)
        existing = self.shard(job_id, group)
        try:
            if existing is not None:
                existing.check_fence(header.fence.generation)
            shard = import_shard(config, header.fence.generation, headers, data, version)
            # Computed before anyone can push to it: exactly what was imported.
            digest = state_digest(
                {h.key: p for h, p in zip(headers, shard.params, strict=True)},
                shard.optimizer.state_dict()["state"],
                [h.key for h in headers],
            )
            self._role(shard, header.fence, header.backup, header.backup_address)
            self.shards.replace(job_id, group, shard)
        except ShardError as exc:
            self._abort(context, exc)
        if existing is not None and isinstance(existing.forward, BackupLink):
            existing.forward.close()
        shard.stats.received(len(data))
        log.info(
            "event=shard_imported ps=%s job=%s group=%s backup=%s generation=%d version=%d "
            "bytes=%d",
            self.ps_id,
            job_id,
            group,
            header.backup,
            header.fence.generation,
            version,
            len(data),
        )
        return ps_pb2.InitShardReply(created=existing is None, version=shard.version, digest=digest)

    def Replicate(self, request_iterator, context):
        """A primary's update, applied on this backup copy (see server/ps/replication.py)."""
        header = self._first(request_iterator, context, "Replicate")
        shard = self._of(header.fence, context)
        buffers = shard.gradient_buffers()
        try:
            shard.check_fence(header.fence.generation)
            contributors = forwarded_contributors(header.workers, header.push_ids, header.batches)
            assembler = Assembler(shard.headers, buffers)
            for index, offset, data in chunks_of(request_iterator):
                shard.stats.received(len(data))
                assembler.add(index, offset, data)
            version = shard.apply_replica(
                header.fence.generation,
                header.version,
                assembler.finish(),
                contributors,
            )
        except (ShardError, WireError) as exc:
            self._abort(context, exc)
        finally:
            shard.recycle(buffers)
        return ps_pb2.ReplicateReply(version=version)

    def OpenReplica(self, request, context):
        """The replication channel of this backup copy: a port and a one-time token."""
        shard = self._of(request.fence, context)
        try:
            shard.check_fence(request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        if not shard.backup:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {request.fence.job_id} group {request.fence.shard}: this copy is a "
                "primary; only a backup takes forwarded updates",
            )
        listener = self.replica_listener()
        token = listener.issue(request.fence.job_id, self.group_of(request.fence))
        return ps_pb2.OpenReplicaReply(port=listener.port, token=token)

    def ConfigureShard(self, request, context):
        """Make a copy the group's primary (forwarding to ``backup_address``) or its backup."""
        shard = self._of(request.fence, context)
        try:
            self._role(shard, request.fence, request.backup, request.backup_address)
        except ShardError as exc:
            self._abort(context, exc)
        log.info(
            "event=shard_configured ps=%s job=%s group=%s backup=%s forwards_to=%s",
            self.ps_id,
            request.fence.job_id,
            request.fence.shard,
            request.backup,
            request.backup_address or "-",
        )
        return self._info(shard, request.fence.shard)
