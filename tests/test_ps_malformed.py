"""Bad input to the parameter server: refused with a status, nothing changed, still serving.

Each malformed push or InitShard is sent with the raw stub over real gRPC and
must come back with the right status code and a message a person can act on,
leave the shard's parameters, optimizer state and version as they were, and
leave the server answering the next, well-formed request (invariant 8).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from elasticd.ps_client import PSTier
from elasticd.rpc import ps_pb2
from elasticd.wire import as_bytes
from tests.fixtures.ps import JOB, PS, PSCluster
from tests.test_ps_service import (
    B_BYTES,
    W_BYTES,
    assert_same_state,
    bitwise_equal,
    shard_state,
    tiny_placement,
    tiny_tensors,
)

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


# -- malformed requests -------------------------------------------------------------------


@pytest.fixture
def tiny(ps_cluster: PSCluster) -> tuple[PS, PSTier]:
    """One PS holding job JOB ("w", "b"; SGD with momentum) after one applied push."""
    (ps,) = ps_cluster.start(1)
    tier = ps_cluster.tier([ps], tiny_placement(ps))
    tier.init(tiny_tensors(), "sgd", {"lr": 0.1, "momentum": 0.9}, -1, 1, 0)
    ones = {k: torch.ones_like(v) for k, v in tiny_tensors().items()}
    tier.push(ones, {ps.ps_id: 0})
    return ps, tier


def push_header(job: str = JOB, base: int = 1, compression: str = "") -> ps_pb2.PushRequest:
    return ps_pb2.PushRequest(
        header=ps_pb2.PushHeader(
            fence=ps_pb2.Fence(job_id=job, generation=1),
            worker_id="w.0",
            base_version=base,
            compression=compression,
        )
    )


def push_chunk(index: int, offset: int, data: bytes) -> ps_pb2.PushRequest:
    return ps_pb2.PushRequest(chunk=ps_pb2.Chunk(index=index, offset=offset, data=data))


def grad_bytes() -> tuple[bytes, bytes]:
    return bytes(W_BYTES), bytes(as_bytes(torch.full((4,), 0.5)))


def good_chunks() -> list[ps_pb2.PushRequest]:
    w, b = grad_bytes()
    return [push_chunk(0, 0, w), push_chunk(1, 0, b)]


def malformed_push(case: str) -> list[ps_pb2.PushRequest]:
    w, b = grad_bytes()
    return {
        "unknown-job": [push_header(job="no-such-job"), *good_chunks()],
        "too-few-bytes": [push_header(), push_chunk(0, 0, w[:40]), push_chunk(1, 0, b)],
        "too-many-bytes": [push_header(), push_chunk(0, 0, w + bytes(4)), push_chunk(1, 0, b)],
        "too-many-bytes-in-second-chunk": [
            push_header(),
            push_chunk(0, 0, w[:32]),
            push_chunk(0, 32, w[32:] + bytes(1)),
            push_chunk(1, 0, b),
        ],
        "tensor-missing": [push_header(), push_chunk(0, 0, w)],
        "unknown-tensor-index": [push_header(), *good_chunks(), push_chunk(2, 0, b)],
        "out-of-order-offsets": [
            push_header(),
            push_chunk(0, 24, w[24:]),
            push_chunk(0, 0, w[:24]),
            push_chunk(1, 0, b),
        ],
        "repeated-chunk": [push_header(), *good_chunks(), push_chunk(1, 0, b)],
        "no-header": good_chunks(),
        "empty-stream": [],
        "second-header": [push_header(), push_header(), *good_chunks()],
        "unknown-compression": [push_header(compression="zstd"), *good_chunks()],
        "future-base-version": [push_header(base=7), *good_chunks()],
    }[case]


MALFORMED = [
    ("unknown-job", grpc.StatusCode.NOT_FOUND, "no shard of job 'no-such-job'"),
    ("too-few-bytes", grpc.StatusCode.INVALID_ARGUMENT, "40 bytes received, expected 48"),
    ("too-many-bytes", grpc.StatusCode.INVALID_ARGUMENT, "52 bytes sent, shape and dtype need 48"),
    ("too-many-bytes-in-second-chunk", grpc.StatusCode.INVALID_ARGUMENT, "49 bytes sent"),
    ("tensor-missing", grpc.StatusCode.INVALID_ARGUMENT, "'b': 0 bytes received, expected 16"),
    ("unknown-tensor-index", grpc.StatusCode.INVALID_ARGUMENT, "chunk for tensor #2"),
    ("out-of-order-offsets", grpc.StatusCode.INVALID_ARGUMENT, "chunk at byte 24, expected byte 0"),
    ("repeated-chunk", grpc.StatusCode.INVALID_ARGUMENT, "chunk at byte 0, expected byte 16"),
    ("no-header", grpc.StatusCode.INVALID_ARGUMENT, "Push must start with a header"),
    ("empty-stream", grpc.StatusCode.INVALID_ARGUMENT, "Push must start with a header"),
    ("second-header", grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the header"),
    ("unknown-compression", grpc.StatusCode.INVALID_ARGUMENT, "unknown compression 'zstd'"),
    ("future-base-version", grpc.StatusCode.INVALID_ARGUMENT, "base_version 7 is not a version"),
]


@pytest.mark.parametrize(("case", "code", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_push_is_rejected_and_changes_nothing(
    ps_cluster: PSCluster, tiny: tuple[PS, PSTier], case: str, code: grpc.StatusCode, message: str
) -> None:
    ps, tier = tiny
    stub = ps_cluster.stub(ps)
    before = shard_state(ps)
    values_before = tier.pull_into(dict(tiny_tensors()))  # a pull works before

    requests = malformed_push(case)
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(iter(requests), timeout=10)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    # The same push in one message, where one message can say it: refused alike.
    if (
        requests
        and requests[0].HasField("header")
        and all(r.HasField("chunk") for r in requests[1:])
    ):
        whole = ps_pb2.PushWhole(header=requests[0].header, chunks=[r.chunk for r in requests[1:]])
        with pytest.raises(grpc.RpcError) as err:
            stub.PushOnce(whole, timeout=10)
        assert err.value.code() == code, err.value.details()
        assert message in err.value.details()

    assert_same_state(before, shard_state(ps))
    # The server still serves: a normal pull returns the unchanged parameters...
    out = {k: torch.full_like(v, float("nan")) for k, v in tiny_tensors().items()}
    assert tier.pull_into(out) == values_before == {ps.ps_id: 1}
    for k, p in zip(("w", "b"), before[1], strict=True):
        assert bitwise_equal(out[k], p)
    # ...and a well-formed push on the same stub still applies.
    reply = stub.Push(iter([push_header(), *good_chunks()]), timeout=10)
    assert (reply.version, reply.applied) == (2, True)


def init_request(
    job: str, metas: list[ps_pb2.TensorMeta], optimizer: str = "sgd", kwargs: str = '{"lr": 0.1}'
) -> ps_pb2.InitShardRequest:
    return ps_pb2.InitShardRequest(
        header=ps_pb2.InitShardHeader(
            fence=ps_pb2.Fence(job_id=job, generation=1),
            tensors=metas,
            optimizer=ps_pb2.OptimizerConfig(name=optimizer, kwargs_json=kwargs),
            max_staleness=-1,
            workers=1,
        )
    )


def init_chunk(index: int, offset: int, data: bytes) -> ps_pb2.InitShardRequest:
    return ps_pb2.InitShardRequest(chunk=ps_pb2.Chunk(index=index, offset=offset, data=data))


META_W = ps_pb2.TensorMeta(key="w", dtype="float32", shape=[3, 4])

MALFORMED_INIT = [
    (
        "unknown-dtype",
        [init_request("job-new", [ps_pb2.TensorMeta(key="w", dtype="complex32", shape=[2])])],
        "unknown dtype 'complex32'",
    ),
    (
        "negative-shape",
        [init_request("job-new", [ps_pb2.TensorMeta(key="w", dtype="float32", shape=[-3])])],
        "negative dimension",
    ),
    (
        "unknown-optimizer",
        [init_request("job-new", [META_W], optimizer="lbfgs"), init_chunk(0, 0, bytes(48))],
        "name: must be one of sgd, adam, adamw, adagrad",
    ),
    (
        "unknown-optimizer-argument",
        [init_request("job-new", [META_W], kwargs='{"lr": 0.1, "foo": 1}')],
        "foo: not an argument of sgd",
    ),
    (
        "kwargs-not-a-mapping",
        [init_request("job-new", [META_W], kwargs="[0.1]")],
        "kwargs: must be a mapping",
    ),
    (
        "kwargs-not-json",
        [init_request("job-new", [META_W], kwargs="{lr: 0.1")],
        "bad shard header",
    ),
    (
        "missing-bytes",
        [init_request("job-new", [META_W]), init_chunk(0, 0, bytes(40))],
        "40 bytes received, expected 48",
    ),
    ("no-header", [init_chunk(0, 0, bytes(48))], "InitShard must start with a header"),
    ("empty-job-id", [init_request("", [META_W])], "fence.job_id is empty"),
]


@pytest.mark.parametrize(
    ("case", "requests", "message"), MALFORMED_INIT, ids=[m[0] for m in MALFORMED_INIT]
)
def test_malformed_init_is_rejected(
    ps_cluster: PSCluster, tiny: tuple[PS, PSTier], case: str, requests: list, message: str
) -> None:
    ps, tier = tiny
    stub = ps_cluster.stub(ps)
    before = shard_state(ps)
    with pytest.raises(grpc.RpcError) as err:
        stub.InitShard(iter(requests), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert not stub.ShardInfo(ps_pb2.ShardInfoRequest(job_id="job-new")).exists
    # The existing job is untouched and still served.
    assert_same_state(before, shard_state(ps))
    assert tier.pull_into(dict(tiny_tensors())) == {ps.ps_id: 1}


def test_bad_header_for_an_existing_job_is_still_rejected(
    ps_cluster: PSCluster, tiny: tuple[PS, PSTier]
) -> None:
    ps, _ = tiny
    before = shard_state(ps)
    with pytest.raises(grpc.RpcError) as err:
        ps_cluster.stub(ps).InitShard(iter([init_request(JOB, [META_W], optimizer="rmsprop")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_same_state(before, shard_state(ps))


@pytest.mark.parametrize("rpc", ["Pull", "Snapshot", "AdvanceGeneration", "DropShard"])
def test_unknown_job_is_not_found(
    ps_cluster: PSCluster, tiny: tuple[PS, PSTier], rpc: str, tmp_path: Path
) -> None:
    ps, _ = tiny
    stub = ps_cluster.stub(ps)
    fence = ps_pb2.Fence(job_id="ghost", generation=1)
    request = {
        "Pull": ps_pb2.PullRequest(fence=fence),
        "Snapshot": ps_pb2.SnapshotRequest(fence=fence, url=str(tmp_path), name="s", step=1),
        "AdvanceGeneration": ps_pb2.AdvanceGenerationRequest(fence=fence),
        "DropShard": ps_pb2.DropShardRequest(fence=fence),
    }[rpc]
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, rpc)(request, timeout=10)
        if rpc == "Pull":
            list(result)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'ghost'" in err.value.details()
    assert stub.ShardInfo(ps_pb2.ShardInfoRequest(job_id=JOB)).version == 1


# -- InitShard is create-once ----------------------------------------------------------------


def test_init_shard_is_create_once(ps_cluster: PSCluster, tiny: tuple[PS, PSTier]) -> None:
    ps, tier = tiny
    before = shard_state(ps)
    other = {k: v + 100 for k, v in tiny_tensors().items()}

    # Through the client: it sees the shard and keeps it.
    assert tier.init(other, "adam", {"lr": 0.5}, 0, 1, 0) == {ps.ps_id: False}
    # Through the raw stub: the servicer itself keeps the first shard.
    w, b = bytes(as_bytes(other["w"])), bytes(as_bytes(other["b"]))
    metas = [META_W, ps_pb2.TensorMeta(key="b", dtype="float32", shape=[4])]
    reply = ps_cluster.stub(ps).InitShard(
        iter(
            [
                init_request(JOB, metas, optimizer="adam", kwargs='{"lr": 0.5}'),
                init_chunk(0, 0, w),
                init_chunk(1, 0, b),
            ]
        ),
        timeout=10,
    )
    assert (reply.created, reply.version) == (False, 1)

    assert_same_state(before, shard_state(ps))
    shard = ps.servicer.shard(JOB)
    assert shard.config.optimizer == "sgd"
    assert isinstance(shard.optimizer, torch.optim.SGD)
    out = dict(tiny_tensors())
    tier.pull_into(out)
    assert not torch.equal(out["w"], other["w"])


def test_init_shard_creates_with_the_sent_values(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    values = tiny_tensors()
    tier = ps_cluster.tier([ps], tiny_placement(ps))
    assert tier.init(values, "adagrad", {"lr": 0.1}, 3, 2, 50) == {ps.ps_id: True}
    shard = ps.servicer.shard(JOB)
    assert (shard.config.max_staleness, shard.config.workers, shard.config.max_version) == (
        3,
        2,
        50,
    )
    assert [h.key for h in shard.headers] == ["w", "b"]
    out = {k: torch.zeros_like(v) for k, v in values.items()}
    assert tier.pull_into(out) == {ps.ps_id: 0}
    for k in values:
        assert bitwise_equal(out[k], values[k])
    info = tier.info()[ps.ps_id]
    assert (info.exists, info.version, info.bytes) == (True, 0, W_BYTES + B_BYTES)
