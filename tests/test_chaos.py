"""`elasticd chaos`: the seeded schedule, a real run's report, and the agent's InjectFault."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import grpc
import psutil
import pytest

from elasticd.chaos.injectors import AgentInjector
from elasticd.chaos.observer import Sample, WorkerView
from elasticd.chaos.outcomes import Outcome, judge, spread
from elasticd.chaos.schedule import Fault, FaultKind, ScheduleError, parse_kinds, plan_faults
from elasticd.chaos.targets import ClusterView, check_local_kinds, load_state
from elasticd.client import JobClient
from elasticd.local import STATE_FILE, start_process
from elasticd.membership import WorkerReport
from elasticd.retry import wait_until
from elasticd.rpc import agent_pb2, agent_pb2_grpc
from elasticd.worker.agent.status_service import CHAOS_OFF
from tests.jobs import spec_yaml

KINDS = parse_kinds("kill:worker,stop:agent,stop:ps,kill:ps")
TARGETS = {"worker": ["node-1.0", "node-0.0"], "agent": ["node-0", "node-1"], "ps": ["ps-0"]}


def test_schedule_is_a_pure_function_of_its_seed():
    plan = plan_faults(7, 120, 10, KINDS, TARGETS, stop_s=3)
    assert plan == plan_faults(7, 120, 10, KINDS, TARGETS, stop_s=3)
    # The order targets were found in does not matter; the seed does.
    shuffled = {role: list(reversed(names)) for role, names in TARGETS.items()}
    assert plan == plan_faults(7, 120, 10, KINDS, shuffled, stop_s=3)
    assert plan != plan_faults(8, 120, 10, KINDS, TARGETS, stop_s=3)

    assert len(plan) == 12
    for f in plan:  # one per interval, in its first half; stops last stop_s
        assert f.index * 10 <= f.at_s <= f.index * 10 + 5
        assert f.target in TARGETS[f.kind.role]
        assert f.stop_s == (3 if f.kind.action == "stop" else 0)
    for round_start in (0, 4, 8):  # every kind once per round
        assert {f.kind for f in plan[round_start : round_start + 4]} == set(KINDS)


def test_schedule_refuses_what_it_cannot_do():
    with pytest.raises(ScheduleError, match="no targets for role"):
        plan_faults(1, 60, 10, parse_kinds("stop:controller"), TARGETS)
    with pytest.raises(ScheduleError, match="ACTION:ROLE"):
        parse_kinds("pause:worker")
    with pytest.raises(ScheduleError, match="interval"):
        plan_faults(1, 60, 0, KINDS, TARGETS)
    assert plan_faults(1, 5, 10, KINDS, TARGETS) == []  # shorter than one interval


def _sample(t: float, step: int, generation: int = 1, pid: int = 10, reachable: bool = True):
    workers = (WorkerView("n0.0", "RUNNING", pid), WorkerView("n1.0", "RUNNING", 11))
    return Sample(t, reachable, "RUNNING", step, 0.5, generation, workers if reachable else ())


def test_outcome_is_decided_from_samples():
    samples = [_sample(0.0, 10), _sample(1.0, 12), _sample(2.0, 12, pid=20), _sample(3.0, 12, pid=20),
               _sample(4.0, 13, pid=20)]  # fmt: skip
    out = judge(1.5, samples)  # a kill at 1.5 s: new pid at 2 s, past step 12 at 4 s
    assert out == Outcome(12, 0.5, "worker restarted", 2.5)
    # A controller that does not answer is a detection; a new generation is one too.
    out = judge(0.5, [_sample(0.0, 5), _sample(1.0, 5, reachable=False), _sample(2.0, 6, 2)])
    assert (out.detected_by, out.detected_after_s, out.recovered_after_s) == (
        "controller unreachable", 0.5, 1.5)  # fmt: skip
    # Nothing changed: undetected, and recovered once the step moved on.
    out = judge(0.5, [_sample(0.0, 5), _sample(1.0, 5), _sample(2.0, 7)])
    assert out == Outcome(5, None, "", 1.5)
    assert spread([1.0, None, 3.0, 2.0]) == {"count": 3, "median": 2.0, "max": 3.0}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_chaos_run_reports_each_fault_and_the_job_completes(cluster, tmp_path):
    c = cluster(ps=1, agents=2)
    state = load_state(c.base_dir / STATE_FILE)
    assert {d.role for d in state.daemons} == {"controller", "ps", "agent"}
    # This cluster's etcd is the session's, not its own: etcd faults are refused.
    with pytest.raises(ScheduleError, match="etcd"):
        check_local_kinds(parse_kinds("stop:etcd"), state)

    spec = tmp_path / "job.yaml"
    spec.write_text(spec_yaml(steps=4500, report_every_steps=10))
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "elasticd", "chaos", str(spec), "--state", str(c.base_dir),
         "--faults", "kill:worker,stop:agent", "--duration", "10", "--interval", "5",
         "--stop-s", "4", "--seed", "1", "--out", str(out), "--timeout", "120"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]

    report = json.loads((out / "report.json").read_text())
    assert report["final"]["state"] == "COMPLETED" and report["final"]["step"] == 4500
    faults = report["faults"]
    assert [f["what"] for f in faults] == ["stop:agent", "kill:worker"]  # seed 1's order
    for f in faults:
        assert f["skipped"] is None and f["pid"] > 0
        assert f["detected_after_s"] is not None and f["detected_after_s"] > 0, f
        assert f["recovered_after_s"] is not None, f
        assert f["recovered_after_s"] >= f["detected_after_s"], f
    stop, kill = faults
    # Its lease ran out while it was stopped: its worker's report went, and a
    # generation without it was sealed (whichever a sample saw first).
    assert stop["detected_by"] in ("worker gone", "generation"), stop
    assert stop["resumed_at_s"] > stop["at_s"]
    assert kill["detected_by"] in ("worker restarted", "worker gone", "generation"), kill
    summary = report["summary"]
    assert summary["injected"] == summary["detected"] == summary["recovered"] == 2
    assert summary["detection_s"]["max"] == max(f["detected_after_s"] for f in faults)

    png = (out / "report.png").read_bytes()
    width, height = _png_size(png)
    assert width >= 400 and height >= 300 and 10_000 < len(png) < 500_000
    assert "stop:agent" in (out / "report.md").read_text()
    # No process this run stopped is left stopped.
    for d in state.daemons:
        assert psutil.Process(d.pid).status() != psutil.STATUS_STOPPED


def _inject(address: str, **fields) -> agent_pb2.InjectFaultReply:
    with grpc.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)
        return stub.InjectFault(agent_pb2.InjectFaultRequest(**fields), timeout=10)


def _status(pid: int) -> str:
    return psutil.Process(pid).status()


def test_agent_injects_faults_only_with_allow_chaos(cluster, tmp_path):
    c = cluster(ps=1, agents=1)  # node-0: started without --allow-chaos
    argv = [sys.executable, "-m", "elasticd", "agent", "--etcd", c.etcd, "--prefix", c.prefix,
            "--lease-ttl", str(c.lease_ttl), "--node-id", "chaos-0", "--host", "127.0.0.1",
            "--warm", "0", "--log-dir", str(c.base_dir / "logs"), "--allow-chaos"]  # fmt: skip
    chaos_agent = start_process("chaos-0", argv, c.base_dir / "logs" / "chaos-0.log")
    c.procs["chaos-0"] = chaos_agent  # stopped with the cluster, whatever happens here
    wait_until(lambda: "chaos-0" in c.registered("nodes"), 60, "agent chaos-0 to register")
    view = ClusterView(c.client, c.keys)
    nodes = view.nodes()

    with pytest.raises(grpc.RpcError) as refused:
        _inject(nodes["node-0"].agent_address, signal="SIGKILL")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == CHAOS_OFF
    assert c.procs["node-0"].alive()

    address = nodes["chaos-0"].agent_address
    with pytest.raises(grpc.RpcError) as bad:
        _inject(address, signal="SIGSTOP")  # it could never resume itself
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as missing:
        _inject(address, job_id="no-such-job", worker_id="chaos-0.0", signal="SIGKILL")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # The agent stops itself and its resumer wakes it.
    pid = chaos_agent.popen.pid
    assert _inject(address, signal="SIGSTOP", resume_after_s=1.0).pid == pid
    wait_until(lambda: _status(pid) == psutil.STATUS_STOPPED, 10, "chaos-0 stopped")
    wait_until(lambda: _status(pid) != psutil.STATUS_STOPPED, 10, "chaos-0 resumed")

    # A training process it supervises, through the chaos injector.
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=100_000, report_every_steps=10))
    workers = lambda: view.workers(job_id)  # noqa: E731

    def running_on_chaos_agent() -> WorkerReport | None:
        w = workers().get("chaos-0.0")
        return w if w and w.state == "RUNNING" and w.pid else None

    victim = wait_until(running_on_chaos_agent, 60, "a worker running on chaos-0")
    injection = AgentInjector(view, job_id).inject(
        Fault(0, 0.0, FaultKind("kill", "worker"), "chaos-0.0")
    )
    assert not injection.skipped and injection.pid == victim.pid
    wait_until(lambda: workers()["chaos-0.0"].restarts == 1, 30, "chaos-0.0 restarted")
    assert c.procs["chaos-0"].alive() and _status(pid) != psutil.STATUS_STOPPED
    client.close()


def test_chaos_help_documents_the_fault_kinds_and_the_report(capsys):
    from elasticd.cli import main

    with pytest.raises(SystemExit) as done:
        main(["chaos", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for words in (
        "usage: elasticd chaos",
        "ACTION:ROLE",
        "--allow-chaos",
        "report.png",
        "--baseline",
    ):
        assert words in text, words
