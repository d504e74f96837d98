"""Client of a job's parameter servers: one channel per PS, calls per slice group in parallel.

A job's slices form groups (elasticd.placement); each group is one shard on
its primary PS, which serves pulls and pushes, and with hot replicas one more
on its backup PS, which only the primary and the controller talk to.

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
from typing import TYPE_CHECKING

import grpc

from elasticd.frames import (
    TensorHeader,
    WireError,
    chunk,
    chunk_fields,
    encode_chunk_frame,
    frame_deserializer,
    frame_serializer,
)
from elasticd.placement import ShardPlacement, Slice
from elasticd.ps_errors import (
    PSUnavailable,
    ShardLost,
    raise_for,
)
from elasticd.ps_state import RPC_TIMEOUT_S, TierState
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.rpc.limits import GRPC_OPTIONS
from elasticd.security.channels import open_channel

if TYPE_CHECKING:
    import torch

    from elasticd.compression import GradientEncoder

# Tensors are the worker side's alone: torch, elasticd.wire and elasticd.compression
# are imported where a call handles tensors, so the controller (info, snapshot,
# data leases) talks to the PS tier without importing torch.

# A shard this small is pulled and pushed in one unary call each way: grpcio's
# streams cost about four unary calls each, which dominates for small tensors.
SMALL_RPC_BYTES = 256 * 1024
SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name


@dataclass(frozen=True)
class PushOutcome:
    version: int
    applied: bool
    staleness: int
    duplicate: bool = False  # the push's batch was applied before; nothing was applied now


def slice_view(tensor: torch.Tensor, s: Slice) -> torch.Tensor:
    return tensor if s.whole else tensor[s.row_start : s.row_end]


class PSTier(TierState):
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
        self.groups = placement.groups
        self._holders = {g: placement.holders(g) for g in self.groups}
        missing = [p for p in self.ps_ids if p not in addresses]
        if missing:
            raise PSUnavailable(f"no address for parameter servers {missing}")
        self.addresses = {p: addresses[p] for p in self.ps_ids}
        self._channels = {p: open_channel(addresses[p], options=GRPC_OPTIONS) for p in self.ps_ids}
        self._ps_stubs = {p: ps_pb2_grpc.ParameterServerStub(c) for p, c in self._channels.items()}
        # Workers talk to each group's primary; the stubs below are by group.
        self._stubs = {g: self._ps_stubs[self._holders[g][0]] for g in self.groups}
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
        self._slices = {g: placement.in_group(g) for g in self.groups}
        self._small = {
            g: sum(s.nbytes for s in self._slices[g]) <= SMALL_RPC_BYTES for g in self.groups
        }
        self._pool = ThreadPoolExecutor(
            max_workers=max(len(self.groups), 1), thread_name_prefix="ps"
        )
        self._encoders: dict[str, GradientEncoder] = {}

    @property
    def fence(self) -> ps_pb2.Fence:
        """The job-wide fence (AdvanceGeneration, DropShard act on every group)."""
        return ps_pb2.Fence(job_id=self.job_id, generation=self.generation)

    def _fence(self, group: str) -> ps_pb2.Fence:
        return ps_pb2.Fence(job_id=self.job_id, generation=self.generation, shard=group)

    def primary(self, group: str) -> str:
        return self._holders[group][0]

    def _each(self, fn) -> dict[str, object]:
        """``fn(group)`` for every group in parallel; the last runs in the calling thread
        (with one group, a call costs no thread handoff). Errors name the group's primary."""
        if not self.groups:
            return {}
        *others, last = self.groups
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
                raise_for(exc, self.primary(p))
        if isinstance(mine, grpc.RpcError):
            raise_for(mine, self.primary(last))
        out[last] = mine
        return out

    def _stream(self, group: str, header_msg, tensors: Mapping[str, torch.Tensor]) -> Iterator:
        from elasticd.wire import as_bytes

        yield header_msg
        for index, s in enumerate(self._slices[group]):
            for offset, piece in chunk(as_bytes(slice_view(tensors[s.param], s))):
                yield encode_chunk_frame(index, offset, piece)

    def _metas(self, group: str, tensors: Mapping[str, torch.Tensor]) -> list[ps_pb2.TensorMeta]:
        from elasticd.wire import header_of

        out = []
        for s in self._slices[group]:
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

        def create(g: str, ps_id: str, backup: bool) -> bool:
            primary, backup_ps = self._holders[g]
            header = ps_pb2.InitShardHeader(
                fence=self._fence(g),
                tensors=self._metas(g, params),
                optimizer=ps_pb2.OptimizerConfig(
                    name=optimizer, kwargs_json=json.dumps(optimizer_kwargs)
                ),
                max_staleness=max_staleness,
                workers=workers,
                max_version=max_version,
                incarnation=self.placement.incarnations.get(ps_id, ""),
                backup=backup,
                backup_address="" if backup or not backup_ps else self.addresses[backup_ps],
            )
            request = ps_pb2.ShardInfoRequest(job_id=self.job_id, shard=g)
            if self._ps_stubs[ps_id].ShardInfo(request, timeout=RPC_TIMEOUT_S).exists:
                return False
            try:
                reply = self._init[ps_id](
                    self._stream(g, ps_pb2.InitShardRequest(header=header), params),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # Restarted since placement, dropped, or fenced: never created here.
                    raise ShardLost(f"{ps_id}: {exc.details()}") from None
                raise
            return reply.created

        def one(g: str) -> bool:
            primary, backup = self._holders[g]
            if backup:  # the backup exists before the primary takes its first push
                try:
                    create(g, backup, True)
                except grpc.RpcError as exc:
                    raise_for(exc, backup)
            return create(g, primary, False)

        return self._each(one)

    def pull_into(self, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Overwrite ``params`` with the PS tier's values; returns each shard's version."""
        import torch

        from elasticd.wire import Assembler

        def one(g: str) -> int:
            slices, p = self._slices[g], self.primary(g)
            request = ps_pb2.PullRequest(fence=self._fence(g), worker_id=self.worker_id)
            if self._small[g]:
                whole = self._stubs[g].PullOnce(request, timeout=RPC_TIMEOUT_S)
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
        from elasticd.compression import GradientEncoder, codec_for

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
        push_id: int = 0,
        batch: int | None = None,
    ) -> dict[str, PushOutcome]:
        """Push ``grads`` to every group; ``compression`` names a codec of elasticd.compression.

        ``base_versions`` are the group versions the gradient was computed on. The
        same push sent again with the same ``push_id`` (after an error left its
        outcome unknown) is applied at most once by each group. ``batch`` names
        the batch index the gradient was computed on: a group that applied that
        batch before answers ``duplicate`` and applies nothing.
        """
        from elasticd.wire import as_bytes

        encoder = self.encoder(compression)

        def dense(g: str) -> PushOutcome:
            header = ps_pb2.PushHeader(
                fence=self._fence(g),
                worker_id=self.worker_id,
                base_version=base_versions[g],
                workers=self.workers,
                push_id=push_id,
                batch=batch,
            )
            if self._small[g]:
                whole = ps_pb2.PushWhole(
                    header=header,
                    chunks=[
                        ps_pb2.Chunk(index=index, offset=offset, data=bytes(piece))
                        for index, s in enumerate(self._slices[g])
                        for offset, piece in chunk(as_bytes(slice_view(grads[s.param], s)))
                    ],
                )
                reply = self._stubs[g].PushOnce(whole, timeout=RPC_TIMEOUT_S)
            else:
                reply = self._push[self.primary(g)](
                    self._stream(g, ps_pb2.PushRequest(header=header), grads),
                    timeout=RPC_TIMEOUT_S,
                )
            return PushOutcome(reply.version, reply.applied, reply.staleness, reply.duplicate)

        def encoded(g: str) -> PushOutcome:
            metas, parts, pending = [], [], {}
            for s in self._slices[g]:
                h, t, residual = encoder.encode(s.key, slice_view(grads[s.param], s))
                metas += [ps_pb2.TensorMeta(key=m.key, dtype=m.dtype, shape=m.shape) for m in h]
                parts += t
                if residual is not None:
                    pending[s.key] = residual
            header = ps_pb2.PushHeader(
                fence=self._fence(g),
                worker_id=self.worker_id,
                base_version=base_versions[g],
                compression=encoder.codec.name,
                payload=metas,
                workers=self.workers,
                push_id=push_id,
                batch=batch,
            )
            reply = self._push[self.primary(g)](
                self._parts_stream(ps_pb2.PushRequest(header=header), parts),
                timeout=RPC_TIMEOUT_S,
            )
            if reply.applied:
                encoder.commit(pending)
            return PushOutcome(reply.version, reply.applied, reply.staleness, reply.duplicate)

        return self._each(dense if encoder.codec.passthrough else encoded)

    @staticmethod
    def _parts_stream(header_msg, parts: list[torch.Tensor]) -> Iterator:
        from elasticd.wire import as_bytes

        yield header_msg
        for index, t in enumerate(parts):
            for offset, piece in chunk(as_bytes(t)):
                yield encode_chunk_frame(index, offset, piece)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self._channels.values():
            c.close()
