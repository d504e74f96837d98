"""Hostile input to a live parameter server, property-based (invariant 8).

One PS for the whole module, serving over real gRPC on loopback, holds a running
job: parameters, SGD momentum state, a version, applied batches and generation 5.
Every RPC of ``proto/ps.proto`` then gets messages built from its descriptor with
hostile values (wrong sizes and dtypes, truncated streams, huge claimed lengths,
unknown jobs, stale generations), and raw bytes that are not its request at all.
Each request must come back with a status (OK, or a code with a message; never
UNKNOWN, never a hang), the job must be exactly as it was, and the server must
not be left with more threads, open files or files in its snapshot directory.

The running job is aimed at with stale generations by every RPC, and with its
current generation only by RPCs that may not change it (reads, create-once
InitShard, and pushes whose bytes do not fit). Other job ids are random: a
request that creates a shard for one of them is well-formed, and allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from elasticd.rpc import ps_pb2
from elasticd.serving import GRPC_THREADS
from elasticd.wire import DTYPES
from tests.fixtures.hostile import (
    HOSTILE_TEXT,
    Answer,
    Footprint,
    answered,
    assert_answered,
    call,
    hostile,
    message_class,
    messages,
    method_id,
    methods,
    open_channel,
    raw_payloads,
)
from tests.fixtures.ps import JOB, PS, PSCluster
from tests.test_ps_service import shard_state, tiny_placement, tiny_tensors

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
GENERATION = 5  # the running job's generation: 0..4 are stale
GROUP = "ps-0"
# Examples per RPC: 16 RPCs x (100 + 30) > 2,000 per run.
MESSAGE_EXAMPLES = 100
RAW_EXAMPLES = 30

# -- the live server -----------------------------------------------------------------


@dataclass
class LivePS:
    ps: PS
    channel: grpc.Channel
    snapshots: Path  # the only directory a hostile url may name
    ok_snapshots: list[int]  # snapshots that succeeded (each writes one file)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LivePS]:
    cluster = PSCluster()
    try:
        # A short synchronous round: a hostile shard created with max_staleness 0
        # answers a push to it within the call timeout.
        (ps,) = cluster.start(1, sync_timeout_s=1.0)
        tier = cluster.tier([ps], tiny_placement(ps))
        tier.init(tiny_tensors(), "sgd", {"lr": 0.1, "momentum": 0.9}, -1, 1, 0)
        ones = {k: torch.ones_like(v) for k, v in tiny_tensors().items()}
        tier.push(ones, {ps.ps_id: 0}, push_id=1, batch=3)
        stub = cluster.stub(ps)
        fence = ps_pb2.Fence(job_id=JOB, generation=GENERATION)
        stub.AdvanceGeneration(ps_pb2.AdvanceGenerationRequest(fence=fence, workers=1), timeout=10)
        channel = open_channel(ps.address)
        cluster.channels.append(channel)
        snapshots = tmp_path_factory.mktemp("hostile-snapshots")
        yield LivePS(ps, channel, snapshots, [0])
    finally:
        cluster.close()


@dataclass(frozen=True)
class JobState:
    version: int
    params: list[bytes]
    optimizer: dict
    generation: int
    role: tuple[bool, str]
    applied: list[int]
    last_push: dict


def job_state(ps: PS) -> JobState:
    version, params, opt = shard_state(ps)
    shard = ps.servicer.shard(JOB, GROUP)
    assert [g for g, _ in ps.servicer.shards.of_job(JOB)] == [GROUP], "a group was added"
    return JobState(
        version,
        [bytes(p.view(-1).view(torch.uint8).numpy()) for p in params],
        {k: bytes(v.reshape(-1).view(torch.uint8).numpy()) for k, v in opt.items()},
        shard.generation,
        (shard.backup, shard.backup_address),
        shard.applied.flat(),
        dict(shard.last_push),
    )


# -- hostile fields ------------------------------------------------------------------

STALE = st.integers(-(1 << 63), GENERATION - 1)
OTHER_JOBS = st.one_of(HOSTILE_TEXT, st.sampled_from(["", "ghost", JOB + " ", JOB.upper()]))
# Mostly the live job's own group, so that requests get past the shard lookup.
GROUPS = st.one_of(st.sampled_from(["", GROUP]), st.sampled_from(["", GROUP, "ps-1"]), HOSTILE_TEXT)


def fences(current: bool) -> st.SearchStrategy[ps_pb2.Fence]:
    """The live job at a stale (or, if ``current``, its own) generation, or another job."""
    stale = st.builds(ps_pb2.Fence, job_id=st.just(JOB), generation=STALE, shard=GROUPS)
    # At its own generation, only the live job's group: a well-formed InitShard of
    # another group would add a slice group to the job, as a worker's may.
    own = st.builds(
        ps_pb2.Fence,
        job_id=st.just(JOB),
        generation=st.just(GENERATION),
        shard=st.sampled_from(["", GROUP]),
    )
    other = messages(ps_pb2.Fence, {"job_id": OTHER_JOBS, "shard": GROUPS})
    return st.one_of(own, stale, own, other) if current else st.one_of(stale, stale, other)


def hostile_dims() -> st.SearchStrategy[list[int]]:
    """Mostly small shapes; sometimes negative, or claiming terabytes."""
    huge = st.sampled_from([1 << 31, 1 << 34, 1 << 40, (1 << 63) - 1, -(1 << 63), -1])
    return st.one_of(
        st.lists(st.integers(0, 4), max_size=3),
        st.lists(st.integers(0, 4), max_size=3),
        st.sampled_from([[1 << 33], [1 << 31, 4], [1 << 40, 1 << 30]]),  # 64 GiB and more
        st.lists(st.one_of(st.integers(-2, 5), huge), max_size=5),
    )


DTYPE_NAMES = st.one_of(
    st.sampled_from(sorted(DTYPES)), st.sampled_from(["complex64", "float8", "", "torch.float32"])
)


def field_overrides(tmp: Path, current: bool) -> dict[str, st.SearchStrategy]:
    return {
        "fence": fences(current),
        "job_id": st.one_of(st.just(JOB), OTHER_JOBS),
        "Fence.shard": GROUPS,
        "ShardInfoRequest.shard": GROUPS,
        "dtype": DTYPE_NAMES,
        "shape": hostile_dims(),
        "key": st.one_of(st.sampled_from(["w", "b", "w[0:2]", "w#values"]), HOSTILE_TEXT),
        "index": st.one_of(st.integers(0, 3), st.sampled_from([(1 << 32) - 1])),
        "offset": st.one_of(st.integers(0, 64), st.sampled_from([(1 << 64) - 1, 1 << 40])),
        "data": st.binary(max_size=64),
        "OptimizerConfig.name": st.one_of(
            st.sampled_from(["sgd", "adam", "adamw", "adagrad"]),
            st.sampled_from(["sgd", "adam", "lbfgs", "SGD", ""]),
            HOSTILE_TEXT,
        ),
        "kwargs_json": st.sampled_from(
            [
                '{"lr": 0.1}',
                "{}",
                '{"lr": 0.1, "momentum": 0.9}',
                '{"lr": -1}',
                '{"lr": "x"}',
                '{"lr": NaN}',
                '{"lr": 1e400}',
                '{"betas": [2, 3]}',
                "[1]",
                "{",
                '{"foo": 1}',
                "null",
                "",
            ]
        ),  # fmt: skip
        "SnapshotRequest.name": st.one_of(st.just("s0"), HOSTILE_TEXT),
        "step": st.one_of(st.integers(0, 3), st.integers(-(1 << 63), (1 << 63) - 1)),
        "compression": st.one_of(
            st.just(""),
            st.sampled_from(
                ["", "none", "fp16", "bf16", "topk:0.5", "topk:-1", "qsgd:0", "qsgd:999"]
            ),
            HOSTILE_TEXT,
        ),
        # Loopback, a closed port, or this module's directory only: never the network,
        # never a relative path into the repository.
        "backup_address": st.sampled_from(["", "127.0.0.1:1", "[::1]:1", "127.0.0.1:99999", ":"]),
        "url": st.one_of(
            st.sampled_from(["", "memory://hostile", "nosuch://x", f"file://{tmp}"]),
            # Under this directory whatever the text ("/" or ".." in it stay inside).
            HOSTILE_TEXT.map(lambda s: f"{tmp}/" + s.replace("..", "_").replace("\x00", "")),
        ),
        "path": HOSTILE_TEXT,
        "sha256": st.one_of(st.just("0" * 64), HOSTILE_TEXT),
        "incarnation": st.one_of(st.just(""), HOSTILE_TEXT),
    }


# RPCs that may aim at the live job's current generation without changing it. Others
# aim at it with stale generations only: with its current one, AdvanceGeneration,
# DropShard, ConfigureShard, ImportShard, RestoreShard and Snapshot are commands the
# controller gives, and a well-formed one does what it says. A new RPC is a line here
# if it is one of these; it is covered with stale generations anyway.
CURRENT_OK = {"InitShard", "Pull", "PullOnce", "Push", "PushOnce", "ShardInfo", "Stats",
              "ExportShard", "Replicate", "OpenReplica"}  # fmt: skip


def _request_class(method):
    return getattr(ps_pb2, method.input_type.name)


def request_strategy(method, tmp: Path) -> st.SearchStrategy:
    cls = _request_class(method)
    one = messages(cls, field_overrides(tmp, method.name in CURRENT_OK))
    if not method.client_streaming:
        return one
    # A stream: mostly a header then bodies, as clients send them; sometimes anything.
    oneof = cls.DESCRIPTOR.oneofs[0]
    head, *bodies = oneof.fields
    overrides = field_overrides(tmp, method.name in CURRENT_OK)
    first = messages(
        cls, {**overrides, head.name: messages(message_class(head.message_type), overrides)}
    )
    rest = st.one_of(
        *(
            messages(cls, {**overrides, b.name: messages(message_class(b.message_type), overrides)})
            for b in bodies
        )
    )
    framed = st.tuples(first, st.lists(rest, max_size=5)).map(lambda t: [t[0], *t[1]])
    return st.one_of(framed, framed, framed, st.lists(one, max_size=4))


# -- would a push change the live job? -------------------------------------------------

_NBYTES = [48, 16]  # w: float32[3, 4], b: float32[4]


def _applies_to_live_job(method_name: str, request) -> bool:
    """Could this push be a well-formed dense push to the live job at its generation?

    Such a push is allowed to apply; the test leaves it out rather than re-deriving
    the server's arithmetic. Random bytes almost never fit both tensors exactly.
    """
    if method_name == "PushOnce":
        header, chunks = request.header, list(request.chunks)
        if not request.HasField("header"):
            return False
    elif method_name == "Push":
        if not request or not request[0].HasField("header"):
            return False
        if not all(r.HasField("chunk") for r in request[1:]):
            return False
        header, chunks = request[0].header, [r.chunk for r in request[1:]]
    else:
        return False
    if header.fence.job_id != JOB or header.fence.generation < GENERATION:
        return False
    got = [0, 0]
    for c in chunks:
        if c.index > 1 or c.offset != got[c.index]:
            return False
        got[c.index] += len(c.data)
    return header.compression in ("", "none") and got == _NBYTES


# -- the properties ------------------------------------------------------------------


def _check(live: LivePS, method, request, before: JobState) -> Answer:
    answer = call(live.channel, method, request)
    if not answered(answer):
        assert_answered(answer, f"{method.name}({request!r:.300})")
    after = job_state(live.ps)
    if after != before:
        raise AssertionError(f"{method.name} changed the live job: {request!r:.300}")
    if method.name == "Snapshot" and answer.code is grpc.StatusCode.OK:
        live.ok_snapshots[0] += 1
    return answer


def _footprint(live: LivePS) -> Footprint:
    return Footprint.now([live.snapshots])


# Pools that grow on demand: the server's handler threads, one per concurrent call.
POOLS = {"grpc_#": GRPC_THREADS}
FD_SLACK = 4  # gRPC's pollers may open an eventfd or two as calls come and go


@pytest.mark.parametrize("method", methods(SERVICE), ids=method_id)
def test_hostile_messages_get_a_status_and_change_nothing(live: LivePS, method, tmp_path):
    before_fp = _footprint(live)
    before = job_state(live.ps)
    snapshots_before = live.ok_snapshots[0]

    @hostile(MESSAGE_EXAMPLES)
    @given(st.data())
    def run(data) -> None:
        request = data.draw(request_strategy(method, live.snapshots), label="request")
        assume(not _applies_to_live_job(method.name, request))
        _check(live, method, request, before)

    run()
    _assert_still_serving(live)
    new_files = _footprint(live).files - before_fp.files
    assert len(new_files) <= live.ok_snapshots[0] - snapshots_before, sorted(new_files)
    before_fp.assert_nothing_left(
        lambda: _footprint(live), POOLS, FD_SLACK, same_files=lambda a, b: True
    )


@pytest.mark.parametrize("method", methods(SERVICE), ids=method_id)
def test_raw_bytes_get_a_status_and_change_nothing(live: LivePS, method):
    before_fp = _footprint(live)
    before = job_state(live.ps)
    valid = request_strategy(method, live.snapshots)
    one = (
        valid.map(lambda r: r[0] if r else ps_pb2.PushRequest())
        if method.client_streaming
        else valid
    )

    @hostile(RAW_EXAMPLES)
    @given(st.data())
    def run(data) -> None:
        raw = data.draw(raw_payloads(one), label="raw")
        request = [raw] if method.client_streaming else raw
        if method.client_streaming and data.draw(st.booleans(), label="more"):
            request = [raw, *data.draw(st.lists(raw_payloads(one), max_size=3), label="rest")]
        _check(live, method, request, before)

    run()
    _assert_still_serving(live)
    before_fp.assert_nothing_left(lambda: _footprint(live), POOLS, FD_SLACK)


def _assert_still_serving(live: LivePS) -> None:
    """A well-formed pull of the live job still returns its parameters."""
    fence = ps_pb2.Fence(job_id=JOB, generation=GENERATION, shard=GROUP)
    reply = ps_pb2.PullWhole.FromString(
        live.channel.unary_unary(f"/{SERVICE.full_name}/PullOnce")(
            ps_pb2.PullRequest(fence=fence, worker_id="w.0").SerializeToString(), timeout=10
        )
    )
    assert reply.header.version == job_state(live.ps).version
    assert [m.key for m in reply.header.tensors] == ["w", "b"]
