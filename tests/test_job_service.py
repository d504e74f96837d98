"""The job service against real controllers: WatchJob, ScaleJob, ListJobs filters, and
the CLI's exit codes.

Controllers run in the test process on the session's real etcd, each behind a real
gRPC server on loopback; nodes register as agents do, and the test reports progress
and worker states as training processes and agents would. No training process is
started: these tests check what the service says, not what trains.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from elasticd.client import JobClient
from elasticd.coord.etcd import EtcdClient
from elasticd.membership import Generation, WorkerReport
from elasticd.retry import wait_until
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.server.controller.controller import Controller
from elasticd.server.controller.service import JobServiceServicer, TrainingCoordinatorServicer
from elasticd.serving import start_grpc_server
from tests.fixtures.controller import Running, start_controller
from tests.jobs import spec_yaml

BATCH = 16

# The fixtures of the controller race tests: a Keys for the test's prefix, and nodes
# registered on a lease as agents register them.


@dataclass
class Served:
    running: Running
    server: grpc.Server

    @property
    def address(self) -> str:
        return self.running.controller.address

    @property
    def controller(self):
        return self.running.controller

    def close(self) -> None:
        self.server.stop(grace=None).wait()
        self.running.close()


@pytest.fixture
def served(etcd, keys) -> Iterator[list]:
    """A factory of leader-elected controllers, each behind its own gRPC server."""
    started: list[Served] = []

    def make(name: str = "c0") -> Served:
        client = EtcdClient(etcd.endpoint)
        controller = Controller(client, keys, "", "/tmp/unused", join_window_s=0.0)

        def add(server) -> None:
            job_pb2_grpc.add_JobServiceServicer_to_server(JobServiceServicer(controller), server)
            job_pb2_grpc.add_TrainingCoordinatorServicer_to_server(
                TrainingCoordinatorServicer(controller), server
            )

        server, port = start_grpc_server(add, "127.0.0.1", 0)
        controller.address = f"127.0.0.1:{port}"
        s = Served(start_controller(etcd.endpoint, keys, name, client, controller), server)
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            s.close()


# -- helpers: what training processes and agents would send -------------------------


def generation(client: EtcdClient, keys, job_id: str) -> Generation | None:
    kv = client.get(keys.generation(job_id))
    return Generation.from_json(kv.value) if kv else None


def sealed(s: Served, keys, job_id: str, size: int) -> Generation:
    return wait_until(
        lambda: (g := generation(s.running.client, keys, job_id)) and len(g.members) == size and g,
        30,
        f"a generation of {size} workers",
    )


def report(address: str, gen: Generation, step: int, loss: float = 1.0) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = job_pb2_grpc.TrainingCoordinatorStub(channel)
        for m in gen.members:
            stub.ReportProgress(
                job_pb2.ProgressReport(
                    job_id=gen.job_id,
                    generation=gen.number,
                    worker_id=m.worker_id,
                    rank=m.rank,
                    step=step,
                    loss=loss,
                ),
                timeout=10,
            )


def agents_report(client: EtcdClient, keys, gen: Generation, state: str, restarts: int = 0):
    for m in gen.members:
        r = WorkerReport(m.worker_id, m.node_id, gen.number, state, restarts=restarts)
        client.put(keys.worker(gen.job_id, m.worker_id), r.to_json())


class Watcher:
    """WatchJob in a thread, as a user's terminal would hold it."""

    def __init__(self, client: JobClient, job_id: str) -> None:
        self.seen: list[job_pb2.JobStatus] = []
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(client, job_id), daemon=True)
        self.thread.start()

    def _run(self, client: JobClient, job_id: str) -> None:
        try:
            for status in client.watch(job_id):
                self.seen.append(status)
        except Exception as exc:
            self.error = exc

    def saw(self, predicate) -> job_pb2.JobStatus | None:
        return next((s for s in reversed(self.seen) if predicate(s)), None)


def allreduce(**fields) -> str:
    return spec_yaml(mode="allreduce", steps=1000, batch_size=BATCH, **fields)


# -- WatchJob ------------------------------------------------------------------------


def test_watch_sends_changes_with_samples_per_s_and_ends_when_the_job_completes(
    served,
    nodes,
    keys,
):
    s = served()
    nodes(2)
    client = JobClient(controller=s.address)
    wait_until(lambda: s.controller.is_leader, 30, "leadership")
    job_id = client.submit_yaml(allreduce(workers={"min": 2, "max": 2}))
    gen = sealed(s, keys, job_id, 2)
    watcher = Watcher(client, job_id)
    wait_until(lambda: watcher.saw(lambda x: x.state == "RUNNING"), 30, "a RUNNING status")
    status_rev = s.running.client.get(keys.job_status(job_id)).mod_revision

    for step in (10, 20, 30):
        report(s.address, gen, step, loss=1.0 / step)
        wait_until(lambda st=step: watcher.saw(lambda x: x.step == st), 30, f"step {step}")
    fast = wait_until(
        lambda: watcher.saw(lambda x: x.step == 30 and x.samples_per_s > 0), 30, "a rate"
    )
    # allreduce: one step takes every rank's batch.
    assert fast.samples_per_s == pytest.approx(fast.steps_per_s * BATCH * 2)
    # Invariant 1: progress is not written to etcd per step.
    assert s.running.client.get(keys.job_status(job_id)).mod_revision == status_rev

    agents_report(s.running.client, keys, gen, "SUCCEEDED")
    watcher.thread.join(timeout=60)
    assert not watcher.thread.is_alive() and watcher.error is None, watcher.error
    final = watcher.seen[-1]
    assert final.state == "COMPLETED"
    assert [w.state for w in final.workers] == ["SUCCEEDED", "SUCCEEDED"]
    assert [x.step for x in watcher.seen] == sorted(x.step for x in watcher.seen)
    client.close()


def test_a_watch_whose_caller_left_frees_its_handler(served, nodes, keys, caplog):
    caplog.set_level(logging.INFO, logger="elasticd.server.controller.service")
    s = served()
    nodes(1)
    wait_until(lambda: s.controller.is_leader, 30, "leadership")
    client = JobClient(controller=s.address)
    job_id = client.submit_yaml(allreduce())
    with grpc.insecure_channel(s.address) as channel:
        stream = job_pb2_grpc.JobServiceStub(channel).WatchJob(
            job_pb2.WatchJobRequest(job_id=job_id)
        )
        assert next(stream).job_id == job_id
        stream.cancel()
    wait_until(
        lambda: f"event=watch_ended job={job_id} caller_active=False" in caplog.text,
        30,
        "the watch to end",
    )
    with pytest.raises(grpc.RpcError) as info:
        next(iter(client.watch("no-such-job")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    client.close()


def test_a_watch_follows_a_controller_fail_over(served, nodes, keys, etcd):
    first = served("c0")
    wait_until(lambda: first.controller.is_leader, 30, "c0 leading")
    second = served("c1")
    nodes(1)
    client = JobClient(etcd=etcd.endpoint, prefix=keys.prefix)
    job_id = client.submit_yaml(allreduce())
    gen = sealed(first, keys, job_id, 1)
    report(first.address, gen, 10)
    watcher = Watcher(client, job_id)
    wait_until(lambda: watcher.saw(lambda x: x.step == 10), 30, "step 10 from c0")

    first.close()  # the leader goes away with its streams
    wait_until(lambda: second.controller.is_leader, 30, "c1 leading")
    report(second.address, gen, 20)  # workers report to the new leader
    wait_until(lambda: watcher.saw(lambda x: x.step == 20), 60, "step 20 through c1")
    agents_report(second.running.client, keys, gen, "SUCCEEDED")
    watcher.thread.join(timeout=60)
    assert watcher.error is None, watcher.error
    assert watcher.seen[-1].state == "COMPLETED"
    client.close()
