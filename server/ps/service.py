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

from elasticd.checkpoint.serialize import state_digest
from elasticd.checkpoint.store import CheckpointStore
from elasticd.compression import CompressionError, check_payload, codec_for, decode_payload
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.server.ps.directory import ShardDirectory, ShardRefused
from elasticd.server.ps.messages import (
    add_to_server,
    job_stats,
    shard_header,
    shard_info,
    tensor_headers,
    tensor_metas,
)
from elasticd.server.ps.metrics import PSCollector, ShardFigures, new_registry
from elasticd.server.ps.shard import (
    SYNC_ROUND_TIMEOUT_S,
    BadRequest,
    DuplicatePush,
    ParameterShard,
    RoundAborted,
    ShardError,
    StaleGeneration,
    StalePush,
)
from elasticd.server.ps.transfer import export_shard, import_shard
from elasticd.wire import (
    CHUNK_BYTES,
    Assembler,
    ChunkFrame,
    WireError,
    chunk_fields,
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
}


def _chunks(requests: Iterator) -> Iterator[tuple[int, int, bytes | memoryview]]:
    """(index, offset, data) of every request; anything but a chunk is an error."""
    for req in requests:
        fields = chunk_fields(req)
        if fields is None:
            raise WireError("only chunks may follow the header")
        yield fields


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(
        self, ps_id: str, sync_timeout_s: float = SYNC_ROUND_TIMEOUT_S, incarnation: str = ""
    ) -> None:
        self.ps_id = ps_id
        self.sync_timeout_s = sync_timeout_s
        self.shards = ShardDirectory(ps_id, incarnation)
        self._lock = threading.Lock()
        self._unknown_jobs = 0
        # Per servicer, so several servers in one process keep separate figures.
        self.registry = new_registry(PSCollector(self.figures, lambda: self._unknown_jobs))

    # -- lookup and error mapping -----------------------------------------

    @property
    def incarnation(self) -> str:
        """This process's boot id: a restarted PS has a new one."""
        return self.shards.incarnation

    def shard(self, job_id: str) -> ParameterShard | None:
        return self.shards.get(job_id)

    def figures(self, job_id: str = "") -> list[ShardFigures]:
        """State and stats of every shard (or of ``job_id``'s), for Stats and /metrics."""
        shards = [s for j, s in self.shards.items() if not job_id or j == job_id]
        return [
            ShardFigures(s.config.job_id, s.generation, s.version, s.nbytes, s.stats.snapshot())
            for s in shards
        ]

    def _require(self, job_id: str, context) -> ParameterShard:
        shard = self.shard(job_id)
        if shard is None:
            with self._lock:
                self._unknown_jobs += 1
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"ps {self.ps_id} holds no shard of job {job_id!r}: unknown job, "
                "or the shard was never initialised",
            )
        return shard

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
        job_id = header.fence.job_id
        headers, config = shard_header(header, context)
        existing = self.shard(job_id)
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
        assembler = Assembler(headers)
        try:
            for index, offset, data in _chunks(request_iterator):
                assembler.add(index, offset, data)
            tensors = assembler.finish()
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        shard = ParameterShard(config, header.fence.generation, headers, tensors)
        winner = self.shards.add(job_id, shard)
        created = winner is shard
        if created:
            shard.stats.received(shard.nbytes)
            log.info(
                "event=shard_created ps=%s job=%s generation=%d tensors=%d bytes=%d",
                self.ps_id,
                job_id,
                header.fence.generation,
                len(headers),
                shard.nbytes,
            )
        return ps_pb2.InitShardReply(created=created, version=winner.version)

    def Pull(self, request, context):
        shard = self._require(request.fence.job_id, context)
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
        shard = self._require(header.fence.job_id, context)
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
            for index, offset, data in _chunks(request_iterator):
                shard.stats.received(len(data))
                assembler.add(index, offset, data)
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
            )
        except (ShardError, WireError, CompressionError) as exc:
            shard.stats.rejected(_REJECTED.get(type(exc), "malformed"))
            self._abort(context, exc)
        finally:
            # Applied or not, the shard holds no reference to a push's buffers once
            # apply returned (a synchronous round has ended by then, too).
            if buffers is not None:
                shard.recycle(buffers)
        if not result.applied:
            shard.stats.rejected("max_version")
        return ps_pb2.PushReply(
            version=result.version, applied=result.applied, staleness=result.staleness
        )

    def Snapshot(self, request, context):
        shard = self._require(request.fence.job_id, context)
        try:
            data, version = export_shard(shard, request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        store = CheckpointStore(request.url)
        record = store.write_shard(request.fence.job_id, request.step, request.name, data)
        log.info(
            "event=shard_snapshot ps=%s job=%s step=%d version=%d bytes=%d",
            self.ps_id,
            request.fence.job_id,
            request.step,
            version,
            record.size,
        )
        return ps_pb2.SnapshotReply(
            path=record.path, sha256=record.sha256, size=record.size, version=version
        )

    def ShardInfo(self, request, context):
        shard = self.shard(request.job_id)
        if shard is None:
            return ps_pb2.ShardInfoReply(exists=False, incarnation=self.incarnation)
        return self._info(shard)

    def AdvanceGeneration(self, request, context):
        if self.shard(request.fence.job_id) is None:
            # No shard here (yet): a late InitShard from an older generation is refused.
            self.shards.raise_floor(request.fence.job_id, request.fence.generation)
        shard = self._require(request.fence.job_id, context)
        try:
            shard.advance(request.fence.generation, request.workers or None)
        except ShardError as exc:
            self._abort(context, exc)
        return self._info(shard)

    def DropShard(self, request, context):
        shard = self._require(request.fence.job_id, context)
        try:
            with shard.lock:
                shard.fence(request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        self.shards.drop(request.fence.job_id)
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

    def ExportShard(self, request, context):
        shard = self._require(request.fence.job_id, context)
        try:
            data, _ = export_shard(shard, request.fence.generation)
        except ShardError as exc:
            self._abort(context, exc)
        shard.stats.sent(len(data))
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            yield ps_pb2.ShardBytes(data=bytes(view[offset : offset + CHUNK_BYTES]))

    def ImportShard(self, request_iterator, context):
        first = self._first(request_iterator, context, "ImportShard")
        header, version = first.shard, first.version
        job_id = header.fence.job_id
        headers, config = shard_header(header, context)
        limit = 2 * sum(h.nbytes for h in headers) + (1 << 20)  # parameters and optimizer state
        buf = bytearray()
        for req in request_iterator:
            if not req.HasField("bytes"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only bytes may follow the header")
            buf += req.bytes.data
            if len(buf) > 2 * limit:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "import larger than its slices need"
                )
        existing = self.shard(job_id)
        try:
            if existing is not None:
                existing.check_fence(header.fence.generation)
            shard = import_shard(config, header.fence.generation, headers, bytes(buf), version)
            # Computed before anyone can push to it: exactly what was imported.
            digest = state_digest(
                {h.key: p for h, p in zip(headers, shard.params, strict=True)},
                shard.optimizer.state_dict()["state"],
                [h.key for h in headers],
            )
            self.shards.replace(job_id, shard)
        except ShardError as exc:
            self._abort(context, exc)
        shard.stats.received(len(buf))
        log.info(
            "event=shard_imported ps=%s job=%s generation=%d version=%d bytes=%d",
            self.ps_id,
            job_id,
            header.fence.generation,
            version,
            len(buf),
        )
        return ps_pb2.InitShardReply(created=existing is None, version=shard.version, digest=digest)

    def _info(self, shard: ParameterShard) -> ps_pb2.ShardInfoReply:
        return shard_info(shard, self.incarnation)
