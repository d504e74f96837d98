"""Each RPC says who may call it, for which job: the table, the docs, the gate, for real.

The decisions are checked as tables over real request messages; then a real PS
over TLS is called the way a hostile training process would call it, with a job
credential of another job, a forged one, one for a newer generation, and as
another worker.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from elasticd.rpc import agent_pb2, job_pb2, ps_pb2, ps_pb2_grpc
from elasticd.security import Security, policy
from elasticd.security.channels import open_channel, use_job_credential
from elasticd.security.config import SecurityError
from elasticd.security.gate import Gate, Refused
from elasticd.security.identities import DAEMON_KINDS, daemon_kinds_of, user_of
from elasticd.security.job_credentials import JobCredential, JobMinter, mint, signing_key, verify
from elasticd.security.tokens import Identity
from elasticd.worker.agent.launch import for_worker

DOCS = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def all_rpcs() -> set[str]:
    out = set()
    for module in (job_pb2, ps_pb2, agent_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out |= {f"{service.full_name}/{m.name}" for m in service.methods}
    return out


def documented() -> dict[str, tuple[str, ...]]:
    rows = re.findall(r"^\| `([\w.]+/\w+)` \| ([^|]+) \|$", DOCS.read_text(), re.M)
    return {rpc: tuple(c.strip() for c in callers.split(",")) for rpc, callers in rows}


def test_every_rpc_of_every_service_is_in_the_table_and_the_docs_say_the_same():
    rpcs = all_rpcs()
    assert len(rpcs) > 30  # the three services' RPCs were found
    assert rpcs - set(policy.RULES) == set(), "RPCs the policy does not list"
    assert set(policy.RULES) - rpcs == set(), "policy rows for RPCs that do not exist"
    assert documented() == policy.RULES


# -- credentials ----------------------------------------------------------------


def test_a_job_credential_verifies_only_with_its_key_and_unaltered():
    key = signing_key(Security(cluster_token="t" * 32))
    token = mint(key, JobCredential("job-a", 3, "w1", 0))
    assert verify(key, token) == JobCredential("job-a", 3, "w1", 0)
    assert verify(signing_key(Security(cluster_token="u" * 32)), token) is None
    body, tag = token.removeprefix("ej1.").split(".")
    assert verify(key, f"ej1.{body}.{tag[:-2]}AA") is None
    forged_body = mint(b"x" * 32, JobCredential("job-b", 3, "w1", 0)).split(".")[1]
    assert verify(key, f"ej1.{forged_body}.{tag}") is None
    assert verify(key, "ej1.%%%.%%%") is None
    assert verify(key, "not a credential") is None
    # the job secret, when set, signs instead of the cluster token
    assert signing_key(Security(cluster_token="t" * 32, job_secret="s")) != key
    assert JobMinter(None)("job", 1, {"w": 0}) == {}  # an open cluster mints none


def test_certificate_names_map_to_kinds():
    assert daemon_kinds_of("elasticd-ps") == ("ps",)
    assert daemon_kinds_of("elasticd-agent:n1") == ("agent",)
    assert daemon_kinds_of("elasticd-node") == DAEMON_KINDS
    for name in ("elasticd-job", "user:alice", "node", "elasticd-root", "ps"):
        assert daemon_kinds_of(name) == ()
    assert user_of("user:alice") == "alice" and user_of("elasticd-ps") is None


# -- decisions ------------------------------------------------------------------

KEY = signing_key(Security(cluster_token="k" * 32))
CLOSED = Security(cluster_token="k" * 32)


def worker(job="a", generation=5, worker_id="w0", rank=0) -> Identity:
    return Identity(f"worker {worker_id}", "", job=JobCredential(job, generation, worker_id, rank))


def fence(job="a", generation=5, shard=""):
    return ps_pb2.Fence(job_id=job, generation=generation, shard=shard)


def push(job="a", generation=5, worker_id="w0"):
    header = ps_pb2.PushHeader(fence=fence(job, generation), worker_id=worker_id)
    return ps_pb2.PushRequest(header=header)


PS_RPC = f"/{policy.PS}/"
COORD = f"/{policy.COORDINATOR}/"

CASES = [
    # (method, identity, request, allowed)
    (PS_RPC + "Pull", worker(), ps_pb2.PullRequest(fence=fence()), True),
    (PS_RPC + "Pull", worker(), ps_pb2.PullRequest(fence=fence(generation=3)), True),
    (PS_RPC + "Pull", worker(), ps_pb2.PullRequest(fence=fence(job="b")), False),
    (PS_RPC + "Pull", worker(), ps_pb2.PullRequest(fence=fence(generation=6)), False),
    (PS_RPC + "Push", worker(), push(), True),
    (PS_RPC + "Push", worker(), push(job="b"), False),
    (PS_RPC + "Push", worker(), push(worker_id="w1"), False),
    (PS_RPC + "Push", worker(), None, False),  # a stream naming no job
    (PS_RPC + "ExportShard", worker(), ps_pb2.ExportShardRequest(fence=fence()), False),
    (PS_RPC + "DropShard", worker(), ps_pb2.DropShardRequest(fence=fence()), False),
    (PS_RPC + "Snapshot", worker(), ps_pb2.SnapshotRequest(fence=fence()), False),
    (PS_RPC + "InitShard", worker(job="b"), None, False),
    (PS_RPC + "DropShard", Identity("elasticd-controller", "", ("controller",)), None, True),
    (PS_RPC + "DropShard", Identity("elasticd-ps", "", ("ps",)), None, False),
    (PS_RPC + "DropShard", Identity("elasticd-agent", "", ("agent",)), None, False),
    (PS_RPC + "OpenReplica", Identity("elasticd-ps", "", ("ps",)), None, True),
    (PS_RPC + "Push", Identity("alice", "admin"), push(), False),  # a user is not a member
    (PS_RPC + "Push", Identity("elasticd-agent", "", ("agent",)), push(), False),
    (
        COORD + "PublishRendezvous",
        worker(rank=0),
        job_pb2.RendezvousAddress(job_id="a", generation=5, worker_id="w0", address="h:1"),
        True,
    ),
    (
        COORD + "PublishRendezvous",
        worker(rank=1, worker_id="w1"),
        job_pb2.RendezvousAddress(job_id="a", generation=5, worker_id="w1", address="h:1"),
        False,
    ),
    (
        COORD + "PublishRendezvous",
        worker(rank=0),
        job_pb2.RendezvousAddress(job_id="a", generation=1005, worker_id="w0", address="h:1"),
        False,
    ),
    (
        COORD + "PublishRendezvous",
        worker(rank=0),
        job_pb2.RendezvousAddress(job_id="a", generation=4, worker_id="w0", address="h:1"),
        False,
    ),
    (
        COORD + "PublishRendezvous",
        worker(job="b"),
        job_pb2.RendezvousAddress(job_id="a", generation=5, worker_id="w0", address="h:1"),
        False,
    ),
    (COORD + "ReportProgress", worker(), job_pb2.ProgressReport(job_id="a", worker_id="w0"), True),
    (COORD + "ReportProgress", worker(), job_pb2.ProgressReport(job_id="a", worker_id="w9"), False),
    (COORD + "LeaseData", worker(), job_pb2.DataLeaseRequest(job_id="b", worker_id="w0"), False),
    (f"/{policy.AGENT}/InjectFault", worker(), agent_pb2.InjectFaultRequest(), False),
    (
        f"/{policy.AGENT}/InjectFault",
        Identity("bob", "admin"),
        agent_pb2.InjectFaultRequest(),
        False,
    ),
    (
        f"/{policy.AGENT}/InjectFault",
        Identity("m", "", daemon_kinds=DAEMON_KINDS),
        agent_pb2.InjectFaultRequest(),
        True,
    ),
    (f"/{policy.USER_SERVICE}/SubmitJob", worker(), job_pb2.SubmitJobRequest(), False),
    (
        f"/{policy.USER_SERVICE}/SubmitJob",
        Identity("m", "", daemon_kinds=DAEMON_KINDS),
        job_pb2.SubmitJobRequest(),
        False,
    ),
    (f"/{policy.USER_SERVICE}/SubmitJob", Identity("alice", "submit"), None, True),
    (f"/{policy.USER_SERVICE}/SubmitJob", Identity("carol", "read"), None, False),
]


@pytest.mark.parametrize("method,identity,request_,allowed", CASES)
def test_the_gate_decides_by_identity_and_scope(method, identity, request_, allowed):
    gate = Gate(CLOSED)
    if allowed:
        gate.authorize(method, identity, request_)
    else:
        with pytest.raises(Refused) as info:
            gate.authorize(method, identity, request_)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert method.rpartition("/")[2] in str(info.value)


def test_a_user_may_change_only_the_jobs_it_owns():
    gate = Gate(CLOSED, owner_of=lambda job: {"bobs": "bob"}.get(job))
    cancel = f"/{policy.USER_SERVICE}/CancelJob"
    with pytest.raises(Refused, match="belongs to bob"):
        gate.authorize(cancel, Identity("alice", "submit"), job_pb2.CancelJobRequest(job_id="bobs"))
    gate.authorize(cancel, Identity("bob", "submit"), job_pb2.CancelJobRequest(job_id="bobs"))
    gate.authorize(cancel, Identity("root", "admin"), job_pb2.CancelJobRequest(job_id="bobs"))


def test_a_token_is_not_sent_in_clear_to_another_host():
    with pytest.raises(SecurityError, match="in clear"):
        open_channel("192.0.2.1:50051", Security(cluster_token="t"))
    with pytest.raises(SecurityError, match="in clear"):
        open_channel("example.invalid:50051", Security(token="t"), caller="user")
    open_channel("127.0.0.1:50051", Security(cluster_token="t")).close()  # loopback
    open_channel("192.0.2.1:50051", Security(cluster_token="t", insecure=True)).close()
    open_channel("192.0.2.1:50051", Security()).close()  # nothing to send


# -- a real PS over TLS, called as a hostile training process would --------------


def call_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_a_job_credential_reaches_only_its_own_job_on_a_real_ps(token_ps):
    address, pki = token_ps
    key = signing_key(pki.daemon("ps"))
    worker_only = Security(tls_ca=pki.daemon("ps").tls_ca)  # no cluster secret, like a worker
    use_job_credential(mint(key, JobCredential("alice-job", 2, "w0", 0)))
    with open_channel(address, worker_only) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        bobs = fence("bob-job", 2)
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert call_code(lambda: stub.ExportShard(
            ps_pb2.ExportShardRequest(fence=bobs), timeout=10).next()) == denied  # fmt: skip
        assert (
            call_code(lambda: stub.DropShard(ps_pb2.DropShardRequest(fence=bobs), timeout=10))
            == denied
        )
        assert (
            call_code(lambda: stub.PullOnce(ps_pb2.PullRequest(fence=bobs), timeout=10)) == denied
        )
        pushes = iter([push("bob-job", 2, "w0")])
        assert call_code(lambda: stub.Push(pushes, timeout=10)) == denied
        # its own job passes the gate: the PS then says it holds no such shard
        mine = ps_pb2.PullRequest(fence=fence("alice-job", 2))
        assert call_code(lambda: stub.PullOnce(mine, timeout=10)) == grpc.StatusCode.NOT_FOUND
        # ... but not for a generation it holds no credential for
        later = ps_pb2.PullRequest(fence=fence("alice-job", 3))
        assert call_code(lambda: stub.PullOnce(later, timeout=10)) == denied
        # and it is not the controller, even for its own job
        drop = ps_pb2.DropShardRequest(fence=fence("alice-job", 2))
        assert call_code(lambda: stub.DropShard(drop, timeout=10)) == denied
    # a credential signed with anything but the cluster's key is nobody
    use_job_credential(mint(b"guess" * 8, JobCredential("bob-job", 2, "w0", 0)))
    with open_channel(address, worker_only) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        pull = ps_pb2.PullRequest(fence=fence("bob-job", 2))
        assert call_code(lambda: stub.PullOnce(pull, timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_each_process_of_a_node_gets_only_its_own_credential():
    node_assignment = {
        "job_id": "a",
        "generation": 4,
        "members": [{"worker_id": "n.0", "rank": 0}, {"worker_id": "n.1", "rank": 1}],
        "credentials": JobMinter(KEY)("a", 4, {"n.0": 0, "n.1": 1}),
    }
    for worker_id, rank in (("n.0", 0), ("n.1", 1)):
        mine = for_worker(node_assignment, worker_id)
        assert "credentials" not in mine and mine["worker_id"] == worker_id
        assert verify(KEY, mine["credential"]) == JobCredential("a", 4, worker_id, rank)
    assert "credential" not in for_worker({**node_assignment, "credentials": {}}, "n.0")
