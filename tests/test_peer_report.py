"""A dead node is left out before its lease expires, on a survivor's word checked with its agent.

The cluster's leases last far longer than the test waits, so the new
generation can only come from the survivor's report: its collective broke when
the peer's node (agent and training process) was SIGKILLed, it named the peer,
and the controller found the peer's agent gone. A report naming a healthy peer
removes nobody, and malformed or stale reports are refused.
"""

from __future__ import annotations

import signal

import grpc
import pytest

from elasticd.client import JobClient
from elasticd.retry import wait_until
from elasticd.rpc import job_pb2, job_pb2_grpc
from tests.jobs import spec_yaml
from tests.test_ps_failures import ENDLESS

LONG_TTL_S = 90  # no lease expires while the test runs


def test_a_survivors_report_removes_a_dead_node_before_its_lease_expires(cluster):
    c = cluster(ps=0, agents=2, lease_ttl=LONG_TTL_S)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        job_id = client.submit_yaml(
            spec_yaml(mode="allreduce", steps=ENDLESS, report_every_steps=5, max_restarts=0)
        )
        first = wait_until(
            lambda: len((s := client.get(job_id)).workers) == 2 and s.step >= 10 and s,
            60,
            "2 workers training",
        )
        by_node = {w.worker_id.split(".")[0]: w.worker_id for w in first.workers}
        survivor, victim = by_node["node-0"], by_node["node-1"]
        gen = first.generation

        with grpc.insecure_channel(c.leader()) as channel:
            stub = job_pb2_grpc.TrainingCoordinatorStub(channel)

            def report(**kw):
                fields = dict(job_id=job_id, generation=gen, worker_id=victim, suspects=[survivor])
                return stub.ReportPeerLost(job_pb2.PeerLostReport(**{**fields, **kw}), timeout=30)

            # A false report: the survivor's agent answers, so nobody is removed.
            reply = report()
            assert (list(reply.confirmed), list(reply.healthy)) == ([], [survivor])
            for bad, code, part in (
                ({"suspects": ["node-9.0"]}, "INVALID_ARGUMENT", "not members"),
                ({"suspects": [victim]}, "INVALID_ARGUMENT", "cannot report itself"),
                ({"suspects": []}, "INVALID_ARGUMENT", "at least one suspect"),
                ({"worker_id": "node-9.0"}, "INVALID_ARGUMENT", "not a member"),
                ({"generation": gen - 1}, "FAILED_PRECONDITION", "not the job's newest"),
                ({"job_id": "no-such-job"}, "NOT_FOUND", "no job"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    report(**bad)
                assert err.value.code() == getattr(grpc.StatusCode, code), bad
                assert part in err.value.details(), err.value.details()
        step = client.get(job_id).step
        later = wait_until(lambda: (s := client.get(job_id)).step > step + 10 and s, 60, "steps")
        assert later.generation == gen and len(later.workers) == 2

        # The victim's node dies whole; its lease lives on for LONG_TTL_S.
        c.kill("node-1", signal.SIGKILL)
        alone = wait_until(
            lambda: (
                (s := client.get(job_id)).generation > gen
                and [w.worker_id for w in s.workers] == [survivor]
                and s
            ),
            40,
            "a generation without the dead node",
        )
        assert c.client.get(c.keys.node("node-1")) is not None, "its lease had expired"
        log = (c.base_dir / "logs" / "controller-0.log").read_text()
        assert f"event=peer_report job={job_id} generation={gen} reporter={survivor} " in log
        assert f"confirmed={victim} healthy=-" in log
        step = alone.step
        wait_until(lambda: client.get(job_id).step > step + 10, 60, "the survivor to train alone")
        client.cancel(job_id)
    finally:
        client.close()
