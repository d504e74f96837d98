"""Client of a job's parameter servers: one channel per PS, calls in parallel.

Pull writes the bytes straight into the caller's tensors (a worker's own
parameters), so a pull costs one copy from the wire and no allocation. Every
call carries the job id and the caller's generation; a PS answers a stale
generation with FAILED_PRECONDITION, raised here as :class:`Fenced`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from elasticd.checkpoint import decode_shard, encode_shard
from elasticd.checkpoint.serialize import state_digest
from elasticd.compression import GradientEncoder, codec_for
from elasticd.placement import ShardPlacement, Slice
from elasticd.ps_errors import (
    PSUnavailable,
    ShardLost,
    raise_for,
)
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.rpc.limits import GRPC_OPTIONS
from elasticd.wire import (
    CHUNK_BYTES,
    Assembler,
    TensorHeader,
    WireError,
    as_bytes,
    chunk,
    chunk_fields,
    dtype_name,
    encode_chunk_frame,
    frame_deserializer,
    frame_serializer,
    header_of,
)

RPC_TIMEOUT_S = 60.0  # one pull/push of a whole shard
# A shard this small is pulled and pushed in one unary call each way: grpcio's
# streams cost about four unary calls each, which dominates for small tensors.
SMALL_RPC_BYTES = 256 * 1024
SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name


@dataclass(frozen=True)
class PushOutcome:
    version: int
    applied: bool
    staleness: int


def slice_view(tensor: torch.Tensor, s: Slice) -> torch.Tensor:
    return tensor if s.whole else tensor[s.row_start : s.row_end]


class PSTier:
    def __init__(
        self,
        job_id: str,
        generation: int,
        placement: ShardPlacement,
        addresses: Mapping[str, str],
        worker_id: str = "",
        workers: int = 0,
    ) -> None:
        self.job_id = job_id
        self.generation = generation
        self.workers = workers  # the generation's size, sent with every push (0: unknown)
        self.placement = placement
        self.worker_id = worker_id
        self.ps_ids = placement.ps_ids
        missing = [p for p in self.ps_ids if p not in addresses]
        if missing:
            raise PSUnavailable(f"no address for parameter servers {missing}")
        self._channels = {
            p: grpc.insecure_channel(addresses[p], options=GRPC_OPTIONS) for p in self.ps_ids
        }
        self._stubs = {p: ps_pb2_grpc.ParameterServerStub(c) for p, c in self._channels.items()}
        # The tensor streams carry chunk frames (elasticd.wire): one copy each way.
        self._pull = {
            p: c.unary_stream(
                f"/{SERVICE}/Pull",
                request_serializer=ps_pb2.PullRequest.SerializeToString,
                response_deserializer=frame_deserializer(ps_pb2.PullReply),
            )
            for p, c in self._channels.items()
        }
        self._push = {
            p: c.stream_unary(
                f"/{SERVICE}/Push",
                request_serializer=frame_serializer,
                response_deserializer=ps_pb2.PushReply.FromString,
            )
            for p, c in self._channels.items()
        }
        self._init = {
            p: c.stream_unary(
                f"/{SERVICE}/InitShard",
                request_serializer=frame_serializer,
                response_deserializer=ps_pb2.InitShardReply.FromString,
            )
            for p, c in self._channels.items()
        }
        self._slices = {p: placement.for_ps(p) for p in self.ps_ids}
        self._small = {
            p: sum(s.nbytes for s in self._slices[p]) <= SMALL_RPC_BYTES for p in self.ps_ids
        }
        self._pool = ThreadPoolExecutor(
            max_workers=max(len(self.ps_ids), 1), thread_name_prefix="ps"
        )
        self._encoders: dict[str, GradientEncoder] = {}

    @property
    def fence(self) -> ps_pb2.Fence:
        return ps_pb2.Fence(job_id=self.job_id, generation=self.generation)

    def _each(self, fn) -> dict[str, object]:
        """``fn(ps_id)`` for every PS in parallel; the last runs in the calling thread
        (with one PS, a call costs no thread handoff)."""
        if not self.ps_ids:
            return {}
        *others, last = self.ps_ids
        futures = {p: self._pool.submit(fn, p) for p in others}
        out: dict[str, object] = {}
        try:
            mine = fn(last)
        except grpc.RpcError as exc:
            mine = exc
        for p, f in futures.items():
            try:
                out[p] = f.result()
            except grpc.RpcError as exc:
                raise_for(exc, p)
        if isinstance(mine, grpc.RpcError):
            raise_for(mine, last)
        out[last] = mine
        return out

    def _stream(self, ps_id: str, header_msg, tensors: Mapping[str, torch.Tensor]) -> Iterator:
        yield header_msg
        for index, s in enumerate(self._slices[ps_id]):
            for offset, piece in chunk(as_bytes(slice_view(tensors[s.param], s))):
                yield encode_chunk_frame(index, offset, piece)

    def _metas(self, ps_id: str, tensors: Mapping[str, torch.Tensor]) -> list[ps_pb2.TensorMeta]:
        out = []
        for s in self._slices[ps_id]:
            h = header_of(s.key, slice_view(tensors[s.param], s))
            out.append(ps_pb2.TensorMeta(key=h.key, dtype=h.dtype, shape=h.shape))
        return out

    # -- worker side --------------------------------------------------------

    def init(
        self,
        params: Mapping[str, torch.Tensor],
        optimizer: str,
        optimizer_kwargs: dict,
        max_staleness: int,
        workers: int,
        max_version: int,
    ) -> dict[str, bool]:
        """Create the job's shards from ``params`` where they do not exist yet."""

        def one(p: str) -> bool:
            header = ps_pb2.InitShardHeader(
                fence=self.fence,
                tensors=self._metas(p, params),
                optimizer=ps_pb2.OptimizerConfig(
                    name=optimizer, kwargs_json=json.dumps(optimizer_kwargs)
                ),
                max_staleness=max_staleness,
                workers=workers,
                max_version=max_version,
                incarnation=self.placement.incarnations.get(p, ""),
            )
            info = self._stubs[p].ShardInfo(ps_pb2.ShardInfoRequest(job_id=self.job_id))
            if info.exists:
                return False
            try:
                reply = self._init[p](
                    self._stream(p, ps_pb2.InitShardRequest(header=header), params),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # Restarted since placement, dropped, or fenced: never created here.
                    raise ShardLost(f"{p}: {exc.details()}") from None
                raise
            return reply.created

        return self._each(one)

    def pull_into(self, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Overwrite ``params`` with the PS tier's values; returns each shard's version."""

        def one(p: str) -> int:
            slices = self._slices[p]
            request = ps_pb2.PullRequest(fence=self.fence, worker_id=self.worker_id)
            if self._small[p]:
                whole = self._stubs[p].PullOnce(request, timeout=RPC_TIMEOUT_S)
                first, replies = whole, iter(ps_pb2.PullReply(chunk=c) for c in whole.chunks)
            else:
                replies = self._pull[p](request, timeout=RPC_TIMEOUT_S)
                first = next(replies)
                if chunk_fields(first) is not None:
                    raise WireError(f"{p}: pull reply does not start with a header")
            headers = [TensorHeader(m.key, m.dtype, tuple(m.shape)) for m in first.header.tensors]
            if [h.key for h in headers] != [s.key for s in slices]:
                raise PSUnavailable(f"{p} holds {[h.key for h in headers]}, expected other slices")
            with torch.no_grad():
                targets = [slice_view(params[s.param], s) for s in slices]
                contiguous = all(t.is_contiguous() for t in targets)
                fill = targets if contiguous else None
                assembler = Assembler(headers, fill)
                for r in replies:
                    fields = chunk_fields(r)
                    if fields is None:
                        raise WireError(f"{p}: only chunks may follow the pull header")
                    assembler.add(*fields)
                got = assembler.finish()
                if not contiguous:
                    for t, g in zip(targets, got, strict=True):
                        t.copy_(g)
            return first.header.version

        return self._each(one)

    def encoder(self, compression: str) -> GradientEncoder:
        """The worker side of a codec, with its error-feedback state, made once per name."""
        if compression not in self._encoders:
            # Seeded by worker id: workers draw independent quantization noise.
            seed = zlib.crc32(f"{self.job_id}/{self.worker_id}".encode())
            self._encoders[compression] = GradientEncoder(codec_for(compression, seed))
        return self._encoders[compression]

    def push(
        self,
        grads: Mapping[str, torch.Tensor],
        base_versions: Mapping[str, int],
        compression: str = "none",
    ) -> dict[str, PushOutcome]:
        """Push ``grads`` to every PS; ``compression`` names a codec of elasticd.compression."""
        encoder = self.encoder(compression)

        def dense(p: str) -> PushOutcome:
            header = ps_pb2.PushHeader(
                fence=self.fence,
                worker_id=self.worker_id,
                base_version=base_versions[p],
                workers=self.workers,
            )
            if self._small[p]:
                whole = ps_pb2.PushWhole(
                    header=header,
                    chunks=[
                        ps_pb2.Chunk(index=index, offset=offset, data=bytes(piece))
                        for index, s in enumerate(self._slices[p])
                        for offset, piece in chunk(as_bytes(slice_view(grads[s.param], s)))
                    ],
                )
                reply = self._stubs[p].PushOnce(whole, timeout=RPC_TIMEOUT_S)
            else:
                reply = self._push[p](
                    self._stream(p, ps_pb2.PushRequest(header=header), grads),
                    timeout=RPC_TIMEOUT_S,
                )
            return PushOutcome(reply.version, reply.applied, reply.staleness)

        def encoded(p: str) -> PushOutcome:
            metas, parts, pending = [], [], {}
            for s in self._slices[p]:
                h, t, residual = encoder.encode(s.key, slice_view(grads[s.param], s))
                metas += [ps_pb2.TensorMeta(key=m.key, dtype=m.dtype, shape=m.shape) for m in h]
                parts += t
                if residual is not None:
                    pending[s.key] = residual
            header = ps_pb2.PushHeader(
                fence=self.fence,
                worker_id=self.worker_id,
                base_version=base_versions[p],
                compression=encoder.codec.name,
                payload=metas,
                workers=self.workers,
            )
            reply = self._push[p](
                self._parts_stream(ps_pb2.PushRequest(header=header), parts),
                timeout=RPC_TIMEOUT_S,
            )
            if reply.applied:
                encoder.commit(pending)
            return PushOutcome(reply.version, reply.applied, reply.staleness)

        return self._each(dense if encoder.codec.passthrough else encoded)

    @staticmethod
    def _parts_stream(header_msg, parts: list[torch.Tensor]) -> Iterator:
        yield header_msg
        for index, t in enumerate(parts):
            for offset, piece in chunk(as_bytes(t)):
                yield encode_chunk_frame(index, offset, piece)

    # -- controller side ------------------------------------------------------

    def snapshot(self, url: str, step: int) -> dict[str, ps_pb2.SnapshotReply]:
        return self._each(
            lambda p: self._stubs[p].Snapshot(
                ps_pb2.SnapshotRequest(fence=self.fence, url=url, name=p, step=step),
                timeout=RPC_TIMEOUT_S,
            )
        )

    def info(self) -> dict[str, ps_pb2.ShardInfoReply]:
        return self._each(
            lambda p: self._stubs[p].ShardInfo(
                ps_pb2.ShardInfoRequest(job_id=self.job_id), timeout=10
            )
        )

    def stats(self) -> dict[str, ps_pb2.JobStats]:
        """Each PS's figures for this job: traffic, push outcomes, staleness, step time."""
        replies = self._each(
            lambda p: self._stubs[p].Stats(ps_pb2.StatsRequest(job_id=self.job_id), timeout=10)
        )
        return {p: r.jobs[0] for p, r in replies.items()}

    def export_state(self) -> dict[str, tuple[dict, dict, dict]]:
        """Every shard's (tensors by slice key, optimizer state_dict, meta), for a switch."""

        def one(p: str):
            replies = self._stubs[p].ExportShard(
                ps_pb2.ExportShardRequest(fence=self.fence), timeout=RPC_TIMEOUT_S
            )
            return decode_shard(b"".join(r.data for r in replies))

        return self._each(one)

    def import_state(
        self,
        parts: Mapping[str, tuple[dict, dict, list[str]]],
        optimizer: str,
        optimizer_kwargs: dict,
        max_staleness: int,
        workers: int,
        max_version: int,
        version: int,
    ) -> dict[str, tuple[str, str]]:
        """Replace every shard with ``parts[ps_id]`` = (tensors, optimizer state, slice keys).

        Returns, per PS, (digest of what was sent, digest of what the shard holds).
        """

        def one(p: str) -> tuple[str, str]:
            tensors, state, keys = parts[p]
            header = ps_pb2.InitShardHeader(
                fence=self.fence,
                tensors=[
                    ps_pb2.TensorMeta(
                        key=k, dtype=dtype_name(tensors[k].dtype), shape=tuple(tensors[k].shape)
                    )
                    for k in keys
                ],
                optimizer=ps_pb2.OptimizerConfig(
                    name=optimizer, kwargs_json=json.dumps(optimizer_kwargs)
                ),
                max_staleness=max_staleness,
                workers=workers,
                max_version=max_version,
            )
            data = encode_shard(
                tensors,
                {"state": state, "param_groups": [{"params": list(range(len(keys)))}]},
                {"keys": keys, "version": version},
            )

            def requests():
                yield ps_pb2.ImportShardRequest(
                    header=ps_pb2.ImportShardHeader(shard=header, version=version)
                )
                view = memoryview(data)
                for offset in range(0, max(len(data), 1), CHUNK_BYTES):
                    yield ps_pb2.ImportShardRequest(
                        bytes=ps_pb2.ShardBytes(data=bytes(view[offset : offset + CHUNK_BYTES]))
                    )

            reply = self._stubs[p].ImportShard(requests(), timeout=RPC_TIMEOUT_S)
            return state_digest(tensors, state, keys), reply.digest

        return self._each(one)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self._channels.values():
            c.close()
