"""The ParameterServer gRPC servicer: validate, call the shard, map errors.

Business logic lives in :mod:`elasticd.server.ps.shard`; this module only
turns requests into calls and domain errors into status codes with messages a
person can act on. A bad request never changes a shard and never stops the
server.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import grpc

from elasticd.checkpoint.serialize import state_digest
from elasticd.checkpoint.store import CheckpointStore
from elasticd.compression import CompressionError, check_payload, codec_for, decode_payload
from elasticd.optimizers import OptimizerError, validate_optimizer
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.server.ps.metrics import Histogram, PSCollector, ShardFigures, new_registry
from elasticd.server.ps.shard import (
    SYNC_ROUND_TIMEOUT_S,
    BadRequest,
    DuplicatePush,
    ParameterShard,
    RoundAborted,
    ShardConfig,
    ShardError,
    StaleGeneration,
    StalePush,
)
from elasticd.server.ps.transfer import export_shard, import_shard
from elasticd.wire import (
    CHUNK_BYTES,
    Assembler,
    ChunkFrame,
    TensorHeader,
    WireError,
    chunk_fields,
    frame_deserializer,
    frame_serializer,
)

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 64 << 30  # refuse shards announcing more than this

_STATUS = {
    StaleGeneration: grpc.StatusCode.FAILED_PRECONDITION,
    StalePush: grpc.StatusCode.ABORTED,
    RoundAborted: grpc.StatusCode.ABORTED,
    DuplicatePush: grpc.StatusCode.ALREADY_EXISTS,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
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


def _headers(metas) -> list[TensorHeader]:
    headers = [TensorHeader(m.key, m.dtype, tuple(m.shape)) for m in metas]
    for h in headers:
        h.validate()
    return headers


def _shard_header(
    header: ps_pb2.InitShardHeader, context
) -> tuple[list[TensorHeader], ShardConfig]:
    """Validate a new shard's header (InitShard, ImportShard); abort with the reason."""
    if not header.fence.job_id:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fence.job_id is empty")
    try:
        headers = _headers(header.tensors)
        kwargs = validate_optimizer(
            header.optimizer.name, json.loads(header.optimizer.kwargs_json or "{}")
        )
    except (WireError, OptimizerError, json.JSONDecodeError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad shard header: {exc}")
    if sum(h.nbytes for h in headers) > MAX_SHARD_BYTES:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "shard larger than this PS accepts")
    config = ShardConfig(
        job_id=header.fence.job_id,
        optimizer=header.optimizer.name,
        optimizer_kwargs=kwargs,
        max_staleness=header.max_staleness,
        workers=max(header.workers, 1),
        max_version=header.max_version,
    )
    return headers, config


def _metas(headers: list[TensorHeader]) -> list[ps_pb2.TensorMeta]:
    return [ps_pb2.TensorMeta(key=h.key, dtype=h.dtype, shape=h.shape) for h in headers]


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, ps_id: str, sync_timeout_s: float = SYNC_ROUND_TIMEOUT_S) -> None:
        self.ps_id = ps_id
        self.sync_timeout_s = sync_timeout_s
        self._shards: dict[str, ParameterShard] = {}
        self._lock = threading.Lock()
        self._unknown_jobs = 0
        # Per servicer, so several servers in one process keep separate figures.
        self.registry = new_registry(PSCollector(self.figures, lambda: self._unknown_jobs))

    # -- lookup and error mapping -----------------------------------------

    def shard(self, job_id: str) -> ParameterShard | None:
        with self._lock:
            return self._shards.get(job_id)

    def figures(self, job_id: str = "") -> list[ShardFigures]:
        """State and stats of every shard (or of ``job_id``'s), for Stats and /metrics."""
        with self._lock:
            shards = [s for j, s in sorted(self._shards.items()) if not job_id or j == job_id]
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
        headers, config = _shard_header(header, context)
        existing = self.shard(job_id)
        if existing is not None:
            # Keep the first; drain the stream so the caller sees a clean reply.
            for _ in request_iterator:
                pass
            return ps_pb2.InitShardReply(created=False, version=existing.version)
        assembler = Assembler(headers)
        try:
            for index, offset, data in _chunks(request_iterator):
                assembler.add(index, offset, data)
            tensors = assembler.finish()
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        shard = ParameterShard(config, header.fence.generation, headers, tensors)
        with self._lock:
            winner = self._shards.setdefault(job_id, shard)
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
            header=ps_pb2.PullHeader(version=version, tensors=_metas(shard.headers))
        )
        yield from frames
        shard.stats.sent(shard.nbytes)  # counted once the whole shard went out

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
                parts = _headers(header.payload)
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
            data, version = shard.snapshot(request.fence.generation)
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
            return ps_pb2.ShardInfoReply(exists=False)
        return self._info(shard)

    def AdvanceGeneration(self, request, context):
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
        with self._lock:
            self._shards.pop(request.fence.job_id, None)
        log.info("event=shard_dropped ps=%s job=%s", self.ps_id, request.fence.job_id)
        return ps_pb2.DropShardReply()

    def Stats(self, request, context):
        figures = self.figures(request.job_id)
        if request.job_id and not figures:
            self._require(request.job_id, context)
        return ps_pb2.StatsReply(
            ps_id=self.ps_id,
            jobs=[_job_stats(f) for f in figures],
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
        headers, config = _shard_header(header, context)
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
        except ShardError as exc:
            self._abort(context, exc)
        with self._lock:
            current = self._shards.get(job_id)
            if current is not None and current.generation > header.fence.generation:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"job {job_id}: generation {header.fence.generation} is stale",
                )
            self._shards[job_id] = shard
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

    @staticmethod
    def _info(shard: ParameterShard) -> ps_pb2.ShardInfoReply:
        return ps_pb2.ShardInfoReply(
            exists=True,
            generation=shard.generation,
            version=shard.version,
            bytes=shard.nbytes,
            tensors=_metas(shard.headers),
        )


def _histogram(h: Histogram) -> ps_pb2.Histogram:
    return ps_pb2.Histogram(bounds=h.bounds, counts=h.counts, sum=h.sum, count=h.count)


def _job_stats(f: ShardFigures) -> ps_pb2.JobStats:
    return ps_pb2.JobStats(
        job_id=f.job_id,
        generation=f.generation,
        version=f.version,
        bytes=f.nbytes,
        bytes_in=f.stats.bytes_in,
        bytes_out=f.stats.bytes_out,
        pulls=f.stats.pulls,
        pushes_applied=f.stats.pushes_applied,
        pushes_rejected=f.stats.pushes_rejected,
        staleness=_histogram(f.stats.staleness),
        optimizer_step_seconds=_histogram(f.stats.step_seconds),
    )


SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]

# Tensor streams whose chunks travel as frames (elasticd.wire): (request, reply) codecs.
_FRAMED = {
    "InitShard": (frame_deserializer(ps_pb2.InitShardRequest), None),
    "Push": (frame_deserializer(ps_pb2.PushRequest), None),
    "Pull": (None, frame_serializer),
}
_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Register ``servicer``: every method of the service as protoc would, with chunk
    frames on the tensor streams.

    Use this rather than the generated ``add_ParameterServerServicer_to_server``:
    Pull yields pre-encoded frames (bytes), which the generated serializer
    does not take. Clients may use either the generated stub or frames.
    """
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(ps_pb2, method.input_type.name)
        reply = getattr(ps_pb2, method.output_type.name)
        deserialize, serialize = _FRAMED.get(method.name, (None, None))
        handlers[method.name] = _HANDLER[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=deserialize or request.FromString,
            response_serializer=serialize or reply.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
