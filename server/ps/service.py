"""The ParameterServer gRPC servicer: validate, call the shard, map errors.

Business logic lives in :mod:`elasticd.server.ps.shard`; this module only
turns requests into calls and domain errors into status codes with messages a
person can act on. A bad request never changes a shard and never stops the
server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc

from elasticd.compression import CompressionError, check_payload, codec_for, decode_payload
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.server.ps.directory import ShardDirectory, ShardRefused
from elasticd.server.ps.messages import (
    add_to_server,
    chunks_of,
    job_stats,
    shard_header,
    shard_info,
    tensor_headers,
    tensor_metas,
)
from elasticd.server.ps.metrics import PSCollector, ShardFigures, new_registry
from elasticd.server.ps.replica_channel import ReplicaListener
from elasticd.server.ps.replication import BackupLink
from elasticd.server.ps.rules import NO_BATCH
from elasticd.server.ps.shard import (
    SYNC_ROUND_TIMEOUT_S,
    BadRequest,
    DuplicatePush,
    NotPrimary,
    ParameterShard,
    ReplicaUnavailable,
    RoundAborted,
    ShardError,
    StaleGeneration,
    StalePush,
)
from elasticd.server.ps.state_rpcs import ShardStateRPCs
from elasticd.wire import (
    Assembler,
    ChunkFrame,
    WireError,
    decode_chunk_frame,
)

__all__ = ["ParameterServerServicer", "add_to_server"]

log = logging.getLogger(__name__)

_STATUS = {
    StaleGeneration: grpc.StatusCode.FAILED_PRECONDITION,
    StalePush: grpc.StatusCode.ABORTED,
    RoundAborted: grpc.StatusCode.ABORTED,
    DuplicatePush: grpc.StatusCode.ALREADY_EXISTS,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ShardRefused: grpc.StatusCode.FAILED_PRECONDITION,
    NotPrimary: grpc.StatusCode.FAILED_PRECONDITION,
    ReplicaUnavailable: grpc.StatusCode.UNAVAILABLE,
}

# Why a push was not applied: the reason label of elasticd_ps_pushes_rejected_total.
_REJECTED = {
    StaleGeneration: "fenced",
    StalePush: "stale",
    RoundAborted: "round_aborted",
    DuplicatePush: "duplicate",
    BadRequest: "malformed",
    WireError: "malformed",
    CompressionError: "malformed",
    NotPrimary: "fenced",
    ReplicaUnavailable: "replica_unavailable",
}


class ParameterServerServicer(ShardStateRPCs, ps_pb2_grpc.ParameterServerServicer):
    def __init__(
        self,
        ps_id: str,
        sync_timeout_s: float = SYNC_ROUND_TIMEOUT_S,
        incarnation: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        self.ps_id = ps_id
        self.host = host  # where the replication channel listens: as the gRPC port does
        self._listener: ReplicaListener | None = None
        self.sync_timeout_s = sync_timeout_s
        self.shards = ShardDirectory(ps_id, incarnation)
        self._lock = threading.Lock()
        self._unknown_jobs = 0
        # Per servicer, so several servers in one process keep separate figures.
        self.registry = new_registry(PSCollector(self.figures, lambda: self._unknown_jobs))

    def replica_listener(self) -> ReplicaListener:
        """This PS's replication channel listener, started on first use."""
        with self._lock:
            if self._listener is None:
                self._listener = ReplicaListener(
                    self.host,
                    lambda job, group: self.shards.get(job, group),
                    lambda exc: _STATUS.get(type(exc), grpc.StatusCode.INTERNAL),
                )
            return self._listener

    def close(self) -> None:
        """Stop what the servicer runs beside its gRPC server (the replication channel)."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    # -- lookup and error mapping -----------------------------------------

    @property
    def incarnation(self) -> str:
        """This process's boot id: a restarted PS has a new one."""
        return self.shards.incarnation

    def shard(self, job_id: str, group: str | None = None) -> ParameterShard | None:
        """``job_id``'s shard of ``group`` here; with no group, the first the PS holds."""
        if group is None:
            held = self.shards.of_job(job_id)
            return held[0][1] if held else None
        return self.shards.get(job_id, group)

    def figures(self, job_id: str = "") -> list[ShardFigures]:
        """State and stats of every shard (or of ``job_id``'s), for Stats and /metrics."""
        shards = [(g, s) for (j, g), s in self.shards.items() if not job_id or j == job_id]
        return [
            ShardFigures(
                s.config.job_id,
                s.generation,
                s.version,
                s.nbytes,
                s.stats.snapshot(),
                group=g,
                backup=s.backup,
            )
            for g, s in shards
        ]

    def _require(self, job_id: str, context, group: str = "") -> ParameterShard:
        shard = self.shard(job_id, group)
        if shard is None:
            with self._lock:
                self._unknown_jobs += 1
            which = f" group {group!r}" if group else ""
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"ps {self.ps_id} holds no shard of job {job_id!r}{which}: unknown job, "
                "or the shard was never initialised",
            )
        return shard

    def group_of(self, fence) -> str:
        """The group a fence names; an unnamed one is the job's one group here, if any."""
        if fence.shard:
            return fence.shard
        held = self.shards.of_job(fence.job_id)
        return held[0][0] if len(held) == 1 else ""

    def _of(self, fence, context) -> ParameterShard:
        """The shard a fence names; an unnamed group means the job's one shard here."""
        if not fence.shard:
            shard = self.shard(fence.job_id)
            if shard is not None:
                return shard
        return self._require(fence.job_id, context, fence.shard)

    @staticmethod
    def _abort(context, exc: Exception):
        if isinstance(exc, (WireError, CompressionError)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        context.abort(_STATUS.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))

    @staticmethod
    def _first(requests: Iterator, context, what: str):
        first = next(requests, None)
        if first is None or isinstance(first, ChunkFrame) or not first.HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must start with a header")
        return first.header

    # -- RPCs -------------------------------------------------------------

    def InitShard(self, request_iterator, context):
        header = self._first(request_iterator, context, "InitShard")
        job_id, group = header.fence.job_id, self.group_of(header.fence)
        headers, config = shard_header(header, context)
        existing = self.shard(job_id, group)
        if existing is not None:
            # Keep the first; drain the stream so the caller sees a clean reply.
            for _ in request_iterator:
                pass
            return ps_pb2.InitShardReply(created=False, version=existing.version)
        try:
            self.shards.check_create(job_id, header.fence.generation, header.incarnation)
        except ShardError as exc:
            log.warning(
                "event=shard_create_refused ps=%s job=%s reason=%r", self.ps_id, job_id, exc
            )
            self._abort(context, exc)
        try:
            assembler = Assembler(headers)
        except (RuntimeError, MemoryError) as exc:  # torch could not allocate the tensors
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"tensors: {exc}")
        try:
            for index, offset, data in chunks_of(request_iterator):
                assembler.add(index, offset, data)
            tensors = assembler.finish()
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        shard = ParameterShard(config, header.fence.generation, headers, tensors)
        self._role(shard, header.fence, header.backup, header.backup_address)
        winner = self.shards.add(job_id, group, shard)
        created = winner is shard
        if created:
            shard.stats.received(shard.nbytes)
            log.info(
                "event=shard_created ps=%s job=%s group=%s backup=%s generation=%d tensors=%d "
                "bytes=%d",
                self.ps_id,
                job_id,
                group,
                header.backup,
                header.fence.generation,
                len(headers),
                shard.nbytes,
            )
        return ps_pb2.InitShardReply(created=created, version=winner.version)

    def Pull(self, request, context):
        shard = self._of(request.fence, context)
        try:
            version, frames = shard.read_frames(request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        shard.stats.pulled()
        yield ps_pb2.PullReply(
            header=ps_pb2.PullHeader(version=version, tensors=tensor_metas(shard.headers))
        )
        yield from frames
        shard.stats.sent(shard.nbytes)  # counted once the whole shard went out

    def PullOnce(self, request, context):
        header, *frames = self.Pull(request, context)
        chunks = [decode_chunk_frame(f) for f in frames]
        return ps_pb2.PullWhole(
            header=header.header,
            chunks=[
                ps_pb2.Chunk(index=c.index, offset=c.offset, data=bytes(c.data)) for c in chunks
            ],
        )

    def PushOnce(self, request, context):
        requests = [ps_pb2.PushRequest(header=request.header)]
        requests += [ps_pb2.PushRequest(chunk=c) for c in request.chunks]
        return self.Push(iter(requests), context)

    def Push(self, request_iterator, context):
        header = self._first(request_iterator, context, "Push")
        shard = self._of(header.fence, context)
        buffers = None
        try:
            codec = codec_for(header.compression)
            shard.check_fence(header.fence.generation)
            if codec.passthrough:
                if header.payload:
                    raise WireError("an uncompressed push lists no payload parts")
                buffers = shard.gradient_buffers()
                assembler = Assembler(shard.headers, buffers)
            else:
                parts = tensor_headers(header.payload)
                check_payload(codec, shard.headers, parts)
                assembler = Assembler(parts)
            for index, offset, data in chunks_of(request_iterator):
                shard.stats.received(len(data))
                assembler.add(index, offset, data)
            batch = header.batch if header.HasField("batch") else NO_BATCH
            if header.HasField("batch") and batch < 0:
                raise BadRequest(f"batch index {batch} is negative")
            grads = assembler.finish()
            if not codec.passthrough:
                grads = decode_payload(codec, shard.headers, grads)
            result = shard.apply(
                header.fence.generation,
                header.base_version,
                grads,
                worker_id=header.worker_id,
                workers=header.workers,
                timeout=self.sync_timeout_s,
                cancelled=lambda: not context.is_active(),
                push_id=header.push_id,
                batch=batch,
            )
        except (ShardError, WireError, CompressionError) as exc:
            shard.stats.rejected(_REJECTED.get(type(exc), "malformed"))
            self._abort(context, exc)
        finally:
            # Applied or not, the shard holds no reference to a push's buffers once
            # apply returned (a synchronous round has ended by then, too).
            if buffers is not None:
                shard.recycle(buffers)
        if not result.applied and not result.duplicate:
            shard.stats.rejected("max_version")
        return ps_pb2.PushReply(
            version=result.version,
            applied=result.applied,
            staleness=result.staleness,
            duplicate=result.duplicate,
        )

    def ShardInfo(self, request, context):
        group, shard = request.shard, self.shard(request.job_id, request.shard)
        if shard is None and not request.shard and self.shards.of_job(request.job_id):
            group, shard = self.shards.of_job(request.job_id)[0]
        if shard is None:
            return ps_pb2.ShardInfoReply(exists=False, incarnation=self.incarnation)
        return self._info(shard, group)

    def AdvanceGeneration(self, request, context):
        """Fence every group of the job held here (and, holding none, remember the floor)."""
        shards = self.shards.of_job(request.fence.job_id)
        if not shards:
            # No shard here (yet): a late InitShard from an older generation is refused.
            self.shards.raise_floor(request.fence.job_id, request.fence.generation)
            self._require(request.fence.job_id, context)
        try:
            for _, shard in shards:
                shard.advance(request.fence.generation, request.workers or None)
        except ShardError as exc:
            self._abort(context, exc)
        return self._info(shards[0][1], shards[0][0])

    def DropShard(self, request, context):
        shards = self.shards.of_job(request.fence.job_id)
        if not shards:
            self._require(request.fence.job_id, context)
        try:
            for _, shard in shards:
                with shard.lock:
                    shard.fence(request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        for shard in self.shards.drop(request.fence.job_id):
            if isinstance(shard.forward, BackupLink):
                shard.forward.close()
        log.info("event=shard_dropped ps=%s job=%s", self.ps_id, request.fence.job_id)
        return ps_pb2.DropShardReply()

    def Stats(self, request, context):
        figures = self.figures(request.job_id)
        if request.job_id and not figures:
            self._require(request.job_id, context)
        return ps_pb2.StatsReply(
            ps_id=self.ps_id,
            jobs=[job_stats(f) for f in figures],
            unknown_job_requests=self._unknown_jobs,
        )

    def _info(self, shard: ParameterShard, group: str = "") -> ps_pb2.ShardInfoReply:
        return shard_info(shard, self.incarnation, group)
