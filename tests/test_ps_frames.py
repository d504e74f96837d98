"""Chunk frames: hand-written protobuf for the tensor streams, read without copies.

Pins: a frame is byte-for-byte what protobuf would accept as the chunk message,
the reader takes every protobuf encoding of a chunk (and hands anything else
to protobuf), hostile bytes never crash it, and a PS serving frames still
talks to clients that use the generated stub.
"""

from __future__ import annotations

import random

import pytest
import torch

from elasticd.rpc import ps_pb2
from elasticd.wire import (
    Assembler,
    ChunkFrame,
    TensorHeader,
    WireError,
    as_bytes,
    chunk_fields,
    decode_chunk_frame,
    encode_chunk_frame,
    frame_deserializer,
)
from tests.fixtures.ps import JOB, PSCluster
from tests.test_ps_service import tiny_placement, tiny_tensors

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

CASES = [
    (0, 0, b""),
    (3, 1 << 40, b"abc"),
    (300, 5, bytes(range(256)) * 4096),
    (2**32 - 1, 2**64 - 1, b"x"),
]
MESSAGES = (ps_pb2.PullReply, ps_pb2.PushRequest, ps_pb2.InitShardRequest)


@pytest.mark.parametrize(("index", "offset", "data"), CASES, ids=["empty", "small", "1MiB", "max"])
def test_frames_are_protobuf(index: int, offset: int, data: bytes) -> None:
    frame = encode_chunk_frame(index, offset, memoryview(data))
    for cls in MESSAGES:
        parsed = cls.FromString(frame)
        assert (parsed.chunk.index, parsed.chunk.offset, parsed.chunk.data) == (index, offset, data)
        # ...and every protobuf encoding of a chunk reads back as a frame.
        standard = cls(
            chunk=ps_pb2.Chunk(index=index, offset=offset, data=data)
        ).SerializeToString()
        got = decode_chunk_frame(standard)
        assert (got.index, got.offset, bytes(got.data)) == (index, offset, data)
    got = decode_chunk_frame(frame)
    assert (got.index, got.offset, bytes(got.data)) == (index, offset, data)


def test_non_chunk_messages_go_to_protobuf() -> None:
    header = ps_pb2.PushRequest(header=ps_pb2.PushHeader(worker_id="w", base_version=3))
    wire = header.SerializeToString()
    assert decode_chunk_frame(wire) is None
    parsed = frame_deserializer(ps_pb2.PushRequest)(wire)
    assert isinstance(parsed, ps_pb2.PushRequest) and parsed.header.base_version == 3
    assert chunk_fields(parsed) is None
    frame = frame_deserializer(ps_pb2.PushRequest)(encode_chunk_frame(1, 2, b"zz"))
    assert isinstance(frame, ChunkFrame) and chunk_fields(frame) == (1, 2, frame.data)
    # A chunk with an unknown field is protobuf's to read (it keeps the known ones).
    inner = b"\x08\x01\x10\x02\x1a\x02zz\x20\x05"  # index, offset, data, then field 4
    unknown = b"\x12" + bytes([len(inner)]) + inner
    assert decode_chunk_frame(unknown) is None
    assert ps_pb2.PushRequest.FromString(unknown).chunk.data == b"zz"


def test_hostile_bytes_never_crash_the_reader() -> None:
    rng = random.Random(7)
    base = encode_chunk_frame(7, 99, b"hello world")
    for _ in range(5000):
        b = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.3:
            b = b[: rng.randrange(len(b))]
        got = decode_chunk_frame(bytes(b))
        if got is not None:
            assert len(got.data) <= len(b)
    assert decode_chunk_frame(b"\x12" + b"\xff" * 11) is None  # endless varint


def test_assembler_fills_targets_in_place_from_views() -> None:
    target = torch.zeros(4, 3)
    source = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    raw = bytes(as_bytes(source))
    assembler = Assembler([TensorHeader("t", "float32", (4, 3))], [target])
    for offset in range(0, len(raw), 20):
        assembler.add(0, offset, memoryview(raw)[offset : offset + 20])
    (out,) = assembler.finish()
    assert out is target and torch.equal(target, source)
    with pytest.raises(WireError, match="not contiguous"):
        Assembler([TensorHeader("t", "float32", (3, 4))], [torch.zeros(4, 3).t()])


def test_generated_stub_talks_to_a_framing_ps(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    tier = ps_cluster.tier([ps], tiny_placement(ps))
    tier.init(tiny_tensors(), "sgd", {"lr": 0.1}, -1, 1, 0)
    replies = list(
        ps_cluster.stub(ps).Pull(ps_pb2.PullRequest(fence=ps_pb2.Fence(job_id=JOB, generation=1)))
    )
    assert [h.key for h in replies[0].header.tensors] == ["w", "b"]
    data = {0: b"", 1: b""}
    for r in replies[1:]:
        data[r.chunk.index] += r.chunk.data
    for i, key in enumerate(("w", "b")):
        assert data[i] == bytes(as_bytes(tiny_tensors()[key]))


def test_pulls_of_one_version_share_its_frames(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    tier = ps_cluster.tier([ps], tiny_placement(ps))
    tier.init(tiny_tensors(), "sgd", {"lr": 0.1}, -1, 1, 0)
    shard = ps.servicer.shard(JOB)
    v0, first = shard.read_frames(1)
    assert shard.read_frames(1) == (v0, first) and shard.read_frames(1)[1] is first
    tier.push({k: torch.ones_like(v) for k, v in tiny_tensors().items()}, {ps.ps_id: 0})
    v1, second = shard.read_frames(1)
    assert (v0, v1) == (0, 1) and second != first
    out = {k: torch.zeros_like(v) for k, v in tiny_tensors().items()}
    tier.pull_into(out)
    assert torch.equal(out["b"], tiny_tensors()["b"] - 0.1)
