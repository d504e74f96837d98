"""The job service against real controllers: WatchJob, ScaleJob, ListJobs filters, and
the CLI's exit codes.

Controllers run in the test process on the session's real etcd, each behind a real
gRPC server on loopback; nodes register as agents do, and the test reports progress
and worker states as training processes and agents would. No training process is
started: these tests check what the service says, not what trains.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from elasticd.cli import main as cli
from elasticd.client import JobClient
from elasticd.coord.etcd import EtcdClient
from elasticd.follow import follow_plain
from elasticd.jobspec import load_spec_yaml
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


# -- ScaleJob and ListJobs -------------------------------------------------------------


def spec_bounds(s: Served, keys, job_id: str) -> tuple[int, int]:
    spec = json.loads(s.running.client.get(keys.job_spec(job_id)).value)
    return spec["workers"]["min"], spec["workers"]["max"]


def test_scale_is_kept_in_etcd_and_plans_the_next_generation(served, nodes, keys):
    s = served()
    nodes(3)
    wait_until(lambda: s.controller.is_leader, 30, "leadership")
    client = JobClient(controller=s.address)
    job_id = client.submit_yaml(allreduce(workers={"min": 1, "max": 1}))
    sealed(s, keys, job_id, 1)

    status = client.scale(job_id, 2, 3)
    assert (status.min_workers, status.max_workers) == (2, 3)
    assert spec_bounds(s, keys, job_id) == (2, 3)  # where a new leader reads them
    sealed(s, keys, job_id, 3)

    for wmin, wmax, field in ((0, 2, "min_workers"), (3, 2, "max_workers"), (1, 5000, "max_")):
        with pytest.raises(grpc.RpcError) as info:
            client.scale(job_id, wmin, wmax)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details(), info.value.details()
    assert spec_bounds(s, keys, job_id) == (2, 3)  # bad input changed nothing

    client.cancel(job_id)
    with pytest.raises(grpc.RpcError) as info:
        client.scale(job_id, 1, 1)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has ended" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.scale("no-such-job", 1, 1)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    client.close()


def test_list_jobs_filters_by_state_name_mode_and_owner(served, nodes, keys):
    s = served()
    wait_until(lambda: s.controller.is_leader, 30, "leadership")
    client = JobClient(controller=s.address)
    a = client.submit_yaml(allreduce(name="alpha"))
    b = s.controller.submit(load_spec_yaml(spec_yaml(name="beta")), owner="alice")
    client.cancel(a)

    def ids(**filters) -> list[str]:
        return sorted(j.job_id for j in client.list(**filters))

    assert ids() == sorted([a, b])
    assert ids(states=["CANCELLED"]) == [a]
    assert ids(states=["PENDING", "WAITING"]) == [b]  # no PS: beta waits
    assert ids(name="beta") == [b]
    assert ids(mode="allreduce") == [a]
    assert ids(owner="alice") == [b]
    assert ids(owner="alice", mode="allreduce") == []
    assert client.get(b).owner == "alice"
    with pytest.raises(grpc.RpcError) as info:
        client.list(states=["DONE"], mode="federated")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "states" in info.value.details() and "mode" in info.value.details()
    client.close()


# -- the CLI: exit codes, --json, and following a job without a terminal -------------


def test_cli_exit_codes_and_json(served, nodes, keys, tmp_path, capsys):
    s = served()
    nodes(1)
    wait_until(lambda: s.controller.is_leader, 30, "leadership")
    at = ["--controller", s.address]
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec_yaml(steps="many", workers={"min": 0}, epochs=3))
    assert cli(["submit", str(bad), *at]) == 2
    err = capsys.readouterr().err
    for field in ("steps:", "workers.min:", "epochs:"):
        assert field in err, err  # every error, each naming its field

    good = tmp_path / "job.yaml"
    good.write_text(allreduce(name="cli"))
    assert cli(["submit", str(good), "--json", *at]) == 0
    job_id = json.loads(capsys.readouterr().out)["job_id"]
    assert cli(["status", job_id, "--json", *at]) == 0
    assert json.loads(capsys.readouterr().out)["job_id"] == job_id
    assert cli(["ls", "--state", "running", "--json", *at]) in (0,)
    listed = json.loads(capsys.readouterr().out)
    assert isinstance(listed, list)
    assert cli(["status", "no-such-job", *at]) == 2
    assert "no-such-job" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli(["scale", job_id, "--min", "x", *at])
    assert exited.value.code == 2

    # submit --follow ends with the job: 1 for a cancelled one, plain lines off a terminal.
    codes: list[int] = []
    follower = threading.Thread(
        target=lambda: codes.append(cli(["submit", str(good), "--follow", *at])), daemon=True
    )
    follower.start()
    follow_id = wait_until(
        lambda: next(
            (
                j.job_id
                for j in JobClient(controller=s.address).list(name="cli")
                if j.job_id != job_id
            ),
            None,
        ),
        30,
        "the followed job",
    )
    JobClient(controller=s.address).cancel(follow_id)
    follower.join(timeout=60)
    assert codes == [1]
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # no terminal: no escape codes
    assert f"job {follow_id} CANCELLED" in out
    assert cli(["scale", follow_id, "--min", "1", *at]) == 2  # it has ended


def test_cli_names_the_unreachable_cluster_and_exits_3(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens there once it is closed
    code = cli(["ls", "--etcd", f"127.0.0.1:{port}", "--connect-timeout", "0.5"])
    assert code == 3
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    code = cli(["status", "--controller", f"127.0.0.1:{port}", "--connect-timeout", "0.5"])
    assert code == 3
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def status_at(step: int, state: str = "RUNNING", generation: int = 1) -> job_pb2.JobStatus:
    return job_pb2.JobStatus(
        job_id="j",
        state=state,
        step=step,
        total_steps=100,
        generation=generation,
        loss=0.5,
        samples_per_s=10.0 * step if state == "RUNNING" else 0.0,  # an ended job measures 0
    )


def test_plain_follow_prints_one_line_per_change_at_most_every_interval():
    now = [0.0]
    statuses = [status_at(i) for i in range(1, 6)]
    statuses.insert(3, status_at(3, generation=2))  # a new generation is always shown
    statuses.append(status_at(5, state="COMPLETED"))

    def fed():
        for st in statuses:
            now[0] += 0.5
            yield st

    out = io.StringIO()
    last = follow_plain(fed(), out, interval_s=2.0, clock=lambda: now[0])
    lines = out.getvalue().splitlines()
    assert last.state == "COMPLETED"
    assert lines[0].startswith("[RUNNING] gen 1") and "step 1/100" in lines[0]
    assert any(line.startswith("[RUNNING] gen 2") for line in lines)
    assert lines[-1].startswith("[COMPLETED]")
    assert "samples/s 50.0" in lines[-1]  # the rate it ran at, not the 0 of a job that ended
    assert len(lines) < len(statuses)  # progress alone is rate-limited


def test_a_script_jobs_status_shows_its_ranks_and_restarts_as_its_agents_report(
    served, nodes, keys
):
    """A script reports nothing to the controller: its ranks' states and restarts come
    from the agents' reports, and the record keeps them once the job has ended."""
    s = served()
    nodes(2)
    wait_until(lambda: s.controller.is_leader, 30, "leadership")
    client = JobClient(controller=s.address)
    text = spec_yaml(mode="script", script={"path": "/srv/train.py"}, workers={"min": 2, "max": 2})
    job_id = client.submit_yaml(text.replace("steps: 100\n", ""))  # a script counts its own
    gen = sealed(s, keys, job_id, 2)
    agents_report(s.running.client, keys, gen, "RUNNING", restarts=1)

    def both_reported():
        x = client.get(job_id)
        return len(x.workers) == 2 and all(w.restarts == 1 for w in x.workers) and x

    status = wait_until(both_reported, 30, "both agents' reports")
    assert [w.state for w in status.workers] == ["RUNNING", "RUNNING"]
    assert status.restarts == 1 and status.total_steps == 0

    agents_report(s.running.client, keys, gen, "SUCCEEDED", restarts=1)
    status = wait_until(
        lambda: (x := client.get(job_id)).state == "COMPLETED" and x, 30, "completion"
    )
    for w in gen.members:  # the agents withdraw their reports once the job has ended
        s.running.client.delete(keys.worker(job_id, w.worker_id))
    status = wait_until(
        lambda: (x := client.get(job_id)) and not s.controller.snapshot(job_id).workers and x,
        30,
        "the reports gone",
    )
    assert [w.state for w in status.workers] == ["SUCCEEDED", "SUCCEEDED"]
    assert status.restarts == 1 and status.total_steps == 0
    client.close()


def test_connect_submits_watches_and_waits_from_python(served, nodes, keys, tmp_path):
    from elasticd import connect
    from elasticd.job_handle import JobFailed

    s = served()
    nodes(1)
    wait_until(lambda: s.controller.is_leader, 30, "leadership")
    spec = tmp_path / "job.yaml"
    # A script job: its cancel waits for no ranks' checkpoint (nothing trains here).
    spec.write_text(spec_yaml(name="nb", mode="script", script={"path": "/srv/train.py"}))
    with connect(controller=s.address) as cluster:
        job = cluster.submit(str(spec))
        gen = sealed(s, keys, job.id, 1)
        # read from etcd, the generation may be ahead of the controller's cache of it
        wait_until(lambda: job.state == "RUNNING", 30, "the controller to report RUNNING")
        assert [j.id for j in cluster.jobs(states=("RUNNING",))] == [job.id]
        agents_report(s.running.client, keys, gen, "RUNNING")
        job.cancel()
        with pytest.raises(JobFailed) as info:
            job.wait(check=True)
        assert info.value.status.state == "CANCELLED"
