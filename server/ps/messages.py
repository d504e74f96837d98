"""What a PS reads from and writes into its messages, apart from the RPC flow.

Validation of a new shard's header (InitShard and ImportShard share it), the
tensor metadata of replies, the statistics message, and the registration of
the servicer with chunk frames on the tensor streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import psutil

from elasticd.optimizers import OptimizerError, validate_optimizer
from elasticd.rpc import ps_pb2
from elasticd.server.ps.metrics import Histogram, ShardFigures
from elasticd.server.ps.shard import ShardConfig
from elasticd.wire import (
    TensorHeader,
    WireError,
    chunk_fields,
    frame_deserializer,
    frame_serializer,
)

MAX_SHARD_BYTES = 64 << 30  # refuse shards announcing more than this


def tensor_headers(metas) -> list[TensorHeader]:
    headers = [TensorHeader(m.key, m.dtype, tuple(m.shape)) for m in metas]
    for h in headers:
        h.validate()
    return headers


def shard_header(header: ps_pb2.InitShardHeader, context) -> tuple[list[TensorHeader], ShardConfig]:
    """Validate a new shard's header (InitShard, ImportShard); abort with the reason."""
    if not header.fence.job_id:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fence.job_id is empty")
    try:
        headers = tensor_headers(header.tensors)
        kwargs = validate_optimizer(
            header.optimizer.name, json.loads(header.optimizer.kwargs_json or "{}")
        )
    except (WireError, OptimizerError, json.JSONDecodeError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad shard header: {exc}")
    if not headers:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensors: a shard holds at least one tensor; the header lists none",
        )
    nbytes = sum(h.nbytes for h in headers)
    if nbytes > MAX_SHARD_BYTES:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "shard larger than this PS accepts")
    # The shard's tensors are allocated when its header arrives, before any byte:
    # a header claiming more than this machine has free is refused, not allocated.
    free = psutil.virtual_memory().available
    if nbytes > free:
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"tensors: the shard needs {nbytes} bytes, this PS has {free} bytes of memory free",
        )
    config = ShardConfig(
        job_id=header.fence.job_id,
        optimizer=header.optimizer.name,
        optimizer_kwargs=kwargs,
        max_staleness=header.max_staleness,
        workers=max(header.workers, 1),
        max_version=header.max_version,
    )
    return headers, config


def tensor_metas(headers: list[TensorHeader]) -> list[ps_pb2.TensorMeta]:
    return [ps_pb2.TensorMeta(key=h.key, dtype=h.dtype, shape=h.shape) for h in headers]


def histogram(h: Histogram) -> ps_pb2.Histogram:
    return ps_pb2.Histogram(bounds=h.bounds, counts=h.counts, sum=h.sum, count=h.count)


def job_stats(f: ShardFigures) -> ps_pb2.JobStats:
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
        staleness=histogram(f.stats.staleness),
        optimizer_step_seconds=histogram(f.stats.step_seconds),
        snapshot_pause_seconds=histogram(f.stats.pause_seconds),
        shard=f.group,
        backup=f.backup,
    )


SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]

# Tensor streams whose chunks travel as frames (elasticd.wire): (request, reply) codecs.
_FRAMED = {
    "InitShard": (frame_deserializer(ps_pb2.InitShardRequest), None),
    "Push": (frame_deserializer(ps_pb2.PushRequest), None),
    "Replicate": (frame_deserializer(ps_pb2.ReplicateRequest), None),
    "Pull": (None, frame_serializer),
}
_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer, server: grpc.Server) -> None:
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


def shard_info(shard, incarnation: str, group: str = "") -> ps_pb2.ShardInfoReply:
    return ps_pb2.ShardInfoReply(
        exists=True,
        shard=group,
        backup=shard.backup,
        backup_address=shard.backup_address,
        generation=shard.generation,
        version=shard.version,
        bytes=shard.nbytes,
        tensors=tensor_metas(shard.headers),
        incarnation=incarnation,
        applied=shard.applied.flat(),
    )


def chunks_of(requests: Iterator) -> Iterator[tuple[int, int, bytes | memoryview]]:
    """(index, offset, data) of every request; anything but a chunk is an error."""
    for req in requests:
        fields = chunk_fields(req)
        if fields is None:
            raise WireError("only chunks may follow the header")
        yield fields
