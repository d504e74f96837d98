"""Hostile input to a live controller, property-based (invariant 8).

One controller for the whole module, leading through a real etcd (the session's)
and serving JobService and TrainingCoordinator over real gRPC on loopback, has
admitted a running allreduce job: sealed at generation 1 on one registered node.
Every RPC of ``proto/job.proto`` then gets messages built from its descriptor
with hostile values (job specs with wrong types and sizes, unknown jobs, stale
generations, made-up workers), and raw bytes that are not its request. Each
must come back with a status (never UNKNOWN, never a hang), the running job must
be as it was (its etcd keys with their revisions, its status, its rendezvous and
progress), and no thread, open file or checkpoint file may be left behind.

The running job is aimed at by every RPC that may not change it; user commands
that would (cancel, checkpoint, a valid switch) aim at other job ids only, and
reports aim at it only under worker ids that are not its members (a member's
report is progress, and counts).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from elasticd.coord.election import Election
from elasticd.coord.etcd import EtcdClient
from elasticd.coord.keys import Keys
from elasticd.coord.session import Session
from elasticd.jobspec import load_spec_yaml
from elasticd.membership import NodeInfo
from elasticd.retry import wait_until
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.server.controller.controller import Controller
from elasticd.server.controller.executor import POOL_THREADS
from elasticd.server.controller.main import lead
from elasticd.server.controller.service import (
    JobServiceServicer,
    TrainingCoordinatorServicer,
    status_message,
)
from elasticd.serving import GRPC_THREADS, start_grpc_server
from tests.fixtures.hostile import (
    HOSTILE_TEXT,
    Footprint,
    answered,
    assert_answered,
    call,
    hostile,
    messages,
    method_id,
    open_channel,
    raw_payloads,
)
from tests.jobs import spec_yaml

SERVICES = [job_pb2.DESCRIPTOR.services_by_name[s] for s in ("JobService", "TrainingCoordinator")]
METHODS = [m for s in SERVICES for m in s.methods]
MEMBER = "node-0.0"  # the live job's one worker
TTL = 3
# Examples per RPC: 12 RPCs x (150 + 45) > 2,000 per run (ListJobs has one message).
MESSAGE_EXAMPLES = 150
RAW_EXAMPLES = 45


@dataclass
class LiveController:
    controller: Controller
    client: EtcdClient
    keys: Keys
    job_id: str
    channel: grpc.Channel
    checkpoints: Path


@pytest.fixture(scope="module")
def live(etcd, tmp_path_factory) -> Iterator[LiveController]:
    keys = Keys(f"/hostile-{uuid.uuid4().hex[:8]}")
    client = EtcdClient(etcd.endpoint)
    checkpoints = tmp_path_factory.mktemp("hostile-checkpoints")
    controller = Controller(client, keys, "", str(checkpoints), join_window_s=0.0)
    server, port = start_grpc_server(
        lambda s: (
            job_pb2_grpc.add_JobServiceServicer_to_server(JobServiceServicer(controller), s),
            job_pb2_grpc.add_TrainingCoordinatorServicer_to_server(
                TrainingCoordinatorServicer(controller), s
            ),
        ),
        "127.0.0.1",
        0,
    )
    controller.address = f"127.0.0.1:{port}"
    controller.start()
    session = Session(client, ttl=TTL, name="controller").start()
    election = Election(session, keys.election, controller.address.encode()).start()
    controller.election = election
    stop = threading.Event()
    loop = threading.Thread(target=lead, args=(controller, election, stop), daemon=True)
    loop.start()
    channel = open_channel(controller.address)
    try:
        info = NodeInfo("node-0", slots=1, cpus=1, address="127.0.0.1")
        session.put(keys.node("node-0"), info.to_json())
        wait_until(lambda: controller.is_leader, 30, "the controller to lead")
        spec = spec_yaml(mode="allreduce", steps=1_000_000, workers={"min": 1, "max": 1})
        job_id = controller.submit(load_spec_yaml(spec))
        wait_until(lambda: _sealed(controller, job_id), 30, "the live job's first seal")
        live = LiveController(controller, client, keys, job_id, channel, checkpoints)
        wait_until(lambda: _settled(live), 30, "the live job to settle")
        yield live
    finally:
        channel.close()
        stop.set()
        loop.join(timeout=10)
        controller.set_leader(False)
        controller.stop()
        server.stop(None).wait()
        session.close()
        client.delete_prefix(keys.prefix + "/")
        client.close()


def _sealed(controller: Controller, job_id: str) -> bool:
    gen = controller.snapshot(job_id).generation
    return gen is not None and [m.worker_id for m in gen.members] == [MEMBER]


_last: list = [None]


def _settled(live: LiveController) -> bool:
    """Two reads in a row see the same state: the seal's writes are all in."""
    now = job_state(live)
    same, _last[0] = now == _last[0], now
    return same


@dataclass(frozen=True)
class JobState:
    keys: tuple  # (key, value, mod revision) of the job's keys and of every assignment
    status: bytes  # JobStatus as GetJob answers it
    rendezvous: str | None
    progress: tuple


def job_state(live: LiveController) -> JobState:
    kvs = []
    for prefix in (live.keys.job(live.job_id), live.keys.all_assignments):
        found, _ = live.client.get_prefix(prefix)
        kvs += [(kv.key, kv.value, kv.mod_revision) for kv in found]
    c = live.controller
    return JobState(
        tuple(sorted(kvs)),
        status_message(c, live.job_id).SerializeToString(deterministic=True),
        _rendezvous(live),
        tuple(sorted(c.progress.of(live.job_id).items())),
    )


def _rendezvous(live: LiveController) -> str | None:
    try:
        reply = job_pb2.RendezvousAddress.FromString(
            live.channel.unary_unary("/elasticd.job.TrainingCoordinator/LookupRendezvous")(
                job_pb2.RendezvousQuery(job_id=live.job_id, generation=1).SerializeToString(),
                timeout=10,
            )
        )
        return reply.address
    except grpc.RpcError as exc:
        return exc.code().name


# -- hostile fields ------------------------------------------------------------------

ANY = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.floats(),
    HOSTILE_TEXT,
    st.none(),
    st.booleans(),
    st.lists(st.integers(-2, 3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(-2, 3), max_size=3),
)

# A job spec: a well-formed one with some fields hostile, gone, or added. Its task
# never exists, so no hostile spec is admitted with a model to build; script jobs
# need no task, and a well-formed one is admitted (it waits for a free node).
SPEC_FIELDS: dict[str, st.SearchStrategy] = {
    "name": st.one_of(st.just("t"), st.just("T"), st.just("a" * 41)),
    "mode": st.sampled_from(["allreduce", "ps-async", "script", "bogus", ""]),
    "task": st.one_of(
        st.just("/nonexistent/task.py"),
        HOSTILE_TEXT.map(lambda s: f"/nonexistent/{s}.py"),
        HOSTILE_TEXT.map(lambda s: f"no_such_task_{s.encode().hex()}"),
    ),
    "steps": st.one_of(st.integers(-3, 10), st.just(1 << 80)),
    "workers": st.fixed_dictionaries({"min": ANY, "max": ANY}),
    "optimizer": st.fixed_dictionaries({"name": st.sampled_from(["sgd", "adam", "x"]), "lr": ANY}),
    "ps": st.fixed_dictionaries({"max_staleness": ANY, "compression": ANY, "replicas": ANY}),
    "checkpoint": st.fixed_dictionaries({"every_steps": ANY, "every_s": ANY, "keep": ANY}),
    "data": st.fixed_dictionaries({"shard_batches": ANY, "epoch_batches": ANY}),
    "script": st.fixed_dictionaries(
        {"path": st.just("/nonexistent/train.py"), "args": ANY, "master_port": ANY}
    ),
    "switch": st.one_of(ANY, st.just([{"at_step": 5, "mode": "ps-async"}])),
    "task_args": ANY,
    "allreduce": st.fixed_dictionaries({"scale_lr": ANY}),
    "max_restarts": ANY,
    "hang_timeout_s": ANY,
}

# Aliases that a careless reader expands into 10**5 leaves.
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcd", "bcde", strict=True)
)


@st.composite
def specs(draw) -> str:
    spec = yaml.safe_load(spec_yaml(task="/nonexistent/task.py"))
    for name, values in SPEC_FIELDS.items():
        action = draw(st.sampled_from(["keep", "keep", "hostile", "drop"]))
        if action == "hostile":
            spec[name] = draw(st.one_of(values, ANY))
        elif action == "drop":
            spec.pop(name, None)
    if draw(st.booleans()):
        spec[draw(HOSTILE_TEXT)] = draw(ANY)
    return yaml.safe_dump(spec)


SPEC_YAML = st.one_of(
    specs(),
    specs(),
    specs(),
    HOSTILE_TEXT,
    st.sampled_from(
        [
            "{",
            "- a\n- b",
            "!!python/object/apply:os.system ['true']",
            "name: t\nmode: script\nsteps: 5\nscript: {path: /nonexistent/x.py}\ntask_args:\n  "
            + LAUGHS.replace("\n", "\n  "),
            "x: " + "y" * ((1 << 20) + 1),  # past the 1 MiB limit
        ]
    ),
)


def field_overrides(live: LiveController, method) -> dict[str, st.SearchStrategy]:
    others = st.one_of(HOSTILE_TEXT, st.just("ghost"), st.just(live.job_id + "x"))
    commands = {"CancelJob", "CheckpointJob", "ScaleJob"}  # they change a live job by design
    job_ids = others if method.name in commands else st.one_of(st.just(live.job_id), others)
    overrides = {
        "job_id": job_ids,
        "worker_id": st.one_of(st.just("node-0.1"), HOSTILE_TEXT).filter(lambda w: w != MEMBER),
        "spec_yaml": SPEC_YAML,
        "base_dir": st.sampled_from(["", "/nonexistent", "relative/dir", "../.."]),
        "resume_from": st.sampled_from(
            ["", "ghost", "/nonexistent/ck", f"file://{live.checkpoints}"]
        ),
        "mode": HOSTILE_TEXT.filter(lambda m: m not in ("ps-async", "allreduce")),
        "address": st.one_of(st.just("127.0.0.1:1"), HOSTILE_TEXT),
        "url": st.sampled_from(["", f"{live.checkpoints}/x", "memory://hostile", "nosuch://x"]),
        "suspects": st.lists(st.one_of(st.just(MEMBER), HOSTILE_TEXT), max_size=3),
        "holder": st.one_of(st.just(""), st.just("h"), HOSTILE_TEXT),
    }
    if method.name == "PublishRendezvous":
        # The live job's generation 1 is open to any caller today (see the report in the
        # module's commit); aimed at stale and invalid generations only.
        overrides["generation"] = st.integers(-(1 << 63), 0)
    return overrides


# -- the properties ------------------------------------------------------------------

# Pools that grow on demand: the server's handler threads (one per concurrent call) and
# the job lanes' shared pool (the script jobs a well-formed hostile spec admits use it).
POOLS = {"grpc_#": GRPC_THREADS, "job_#": POOL_THREADS}
FD_SLACK = 4  # gRPC's pollers may open an eventfd or two as calls come and go


def _check(live: LiveController, method, request, before: JobState) -> None:
    answer = call(live.channel, method, request)
    if not answered(answer):
        assert_answered(answer, f"{method.name}({request!r:.300})")
    if job_state(live) != before:
        raise AssertionError(f"{method.name} changed the live job: {request!r:.300}")


def _footprint(live: LiveController) -> Footprint:
    return Footprint.now([live.checkpoints])


def _property(live: LiveController, method, requests: st.SearchStrategy, examples: int) -> None:
    """Every request drawn from ``requests`` gets a status and leaves the job and server as
    they were."""
    before_fp = _footprint(live)
    before = job_state(live)

    @hostile(examples)
    @given(requests)
    def run(request) -> None:
        _check(live, method, request, before)

    run()
    before_fp.assert_nothing_left(lambda: _footprint(live), POOLS, FD_SLACK)


def _messages(live: LiveController, method) -> st.SearchStrategy:
    return messages(getattr(job_pb2, method.input_type.name), field_overrides(live, method))


@pytest.mark.parametrize("method", METHODS, ids=method_id)
def test_hostile_messages_get_a_status_and_change_nothing(live: LiveController, method):
    _property(live, method, _messages(live, method), MESSAGE_EXAMPLES)


@pytest.mark.parametrize("method", METHODS, ids=method_id)
def test_raw_bytes_get_a_status_and_change_nothing(live: LiveController, method):
    raw = raw_payloads(_messages(live, method))
    if method.client_streaming:
        raw = raw.map(lambda b: [b])
    _property(live, method, raw, RAW_EXAMPLES)
