"""End to end: real etcd, controller, parameter servers, agents and workers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest

from elasticd.checkpoint import CheckpointStore, decode_shard
from elasticd.client import JobClient
from elasticd.membership import WorkerReport
from elasticd.retry import wait_until
from tests.jobs import spec_yaml


def workers_of(cluster, job_id: str) -> dict[str, WorkerReport]:
    kvs, _ = cluster.client.get_prefix(cluster.keys.workers(job_id))
    return {r.worker_id: r for r in (WorkerReport.from_json(kv.value) for kv in kvs)}


def worker_of(p: psutil.Process) -> tuple[str, str] | None:
    """(job id, worker id) a training process runs as, or None.

    A process started for its job carries them in its environment; a warm
    interpreter taken for the job got them later, in-process, which
    /proc/<pid>/environ never shows, but its stdout is then the worker's log,
    ``<log-dir>/<job>/<worker>.log``.
    """
    env = p.environ()
    if env.get("ELASTICD_JOB_ID"):
        return env["ELASTICD_JOB_ID"], env.get("ELASTICD_WORKER_ID", "")
    try:
        out = Path(os.readlink(f"/proc/{p.pid}/fd/1"))
    except OSError:
        return None
    if "elasticd.worker.runtime" in " ".join(p.cmdline()) and out.suffix == ".log":
        return out.parent.name, out.stem
    return None


def processes_of_job(job_id: str, worker_id: str = "") -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            who = worker_of(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if who and who[0] == job_id and (not worker_id or who[1] == worker_id):
            found.append(p)
    return found


def test_job_completes_with_checkpoint_and_falling_loss(cluster):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(
        spec_yaml(
            steps=200,
            checkpoint={"every_steps": 80},
            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.5},
        )
    )
    status = client.wait(job_id, timeout=120, interval=0.2)

    assert status.state == "COMPLETED", status
    assert status.step == 200
    assert status.loss < status.first_loss / 10
    assert status.checkpoint.endswith("MANIFEST.json")
    store = CheckpointStore(str(c.base_dir / "checkpoints"))
    manifests = store.list_manifests(job_id)
    steps = sorted(m.step for m in manifests)
    assert steps[-1] == 200 and len(steps) >= 2, steps  # periodic ones, then the final one
    latest = store.latest(job_id)
    assert latest is not None and latest.step == 200 and store.verify(latest)
    assert {s.name for s in latest.shards} == {"ps-0", "ps-1"}
    # Each shard holds exactly the applied updates: version 200, never more.
    assert set(latest.extra["versions"].values()) == {200}
    _, state, meta = decode_shard(store.read_shard(latest, "ps-0"))
    assert meta["version"] == 200
    assert state["state"], "momentum buffers must be in the checkpoint"
    client.close()
    # Only the PS and the training processes hold tensors: through submit, placement,
    # training and checkpoints the controller and the agents never imported torch.
    for name in ("controller-0", "node-0", "node-1"):
        assert "libtorch" not in Path(f"/proc/{c.procs[name].popen.pid}/maps").read_text(), name
    assert "libtorch" in Path(f"/proc/{c.procs['ps-0'].popen.pid}/maps").read_text()


def test_killed_worker_is_restarted_and_no_update_is_lost_or_doubled(cluster):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=1500, report_every_steps=5))
    wait_until(lambda: client.get(job_id).step >= 50, 60, "training to pass step 50")
    victim = sorted(workers_of(c, job_id).values(), key=lambda r: r.worker_id)[0]
    os.kill(victim.pid, signal.SIGKILL)

    wait_until(
        lambda: workers_of(c, job_id)[victim.worker_id].restarts == 1,
        30,
        f"agent to restart {victim.worker_id}",
    )
    status = client.wait(job_id, timeout=180, interval=0.5)
    assert status.state == "COMPLETED", status
    latest = CheckpointStore(str(c.base_dir / "checkpoints")).latest(job_id)
    assert set(latest.extra["versions"].values()) == {1500}
    assert status.generation == 1  # a restart in ps-async mode needs no new generation
    client.close()


def test_bad_spec_is_refused_with_the_field_and_the_controller_keeps_serving(cluster):
    c = cluster(ps=1, agents=1)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    bad = {
        "mode": spec_yaml(mode="federated"),
        "workers.min": spec_yaml(workers={"min": 0}),
        "optimizer.name": spec_yaml(optimizer={"name": "lamb"}),
        "task_args": spec_yaml(task_args={"no_such_arg": 1}),
        "spec": "just a string",
    }
    for field, text in bad.items():
        with pytest.raises(grpc.RpcError) as info:
            client.submit_yaml(text)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details(), info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.get("no-such-job")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.list() == []  # nothing was admitted

    job_id = client.submit_yaml(spec_yaml(steps=50))
    assert client.wait(job_id, timeout=60, interval=0.2).state == "COMPLETED"
    client.close()


def test_cli_names_the_bad_field(tmp_path, etcd):
    spec = tmp_path / "job.yaml"
    spec.write_text(spec_yaml(steps="many"))
    out = subprocess.run(
        [sys.executable, "-m", "elasticd", "submit", str(spec), "--etcd", etcd.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "steps: must be an integer" in out.stderr


def test_stopping_the_cluster_leaves_no_process(cluster):
    c = cluster(ps=1, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=100000))
    wait_until(lambda: len(processes_of_job(job_id)) == 2, 60, "two training processes")
    pids = [p.pid for p in processes_of_job(job_id)] + [p.popen.pid for p in c.procs.values()]
    client.close()
    c.stop()
    alive = [
        pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]
    assert alive == []


def test_killed_agent_takes_its_workers_with_it(cluster):
    c = cluster(ps=1, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=100000))
    wait_until(lambda: len(processes_of_job(job_id)) == 2, 60, "two training processes")
    wait_until(lambda: client.get(job_id).step >= 20, 60, "training to pass step 20")
    c.kill("node-1", signal.SIGKILL)
    # The parent-death signal ends node-1's worker; node-0's carries on.
    wait_until(lambda: len(processes_of_job(job_id)) == 1, 30, "node-1's worker to die with it")
    status = wait_until(
        lambda: (s := client.get(job_id)).generation >= 2 and s,
        30,
        "a new generation without node-1",
    )
    assert [w.node_id for w in status.workers] == ["node-0"]
    assert status.state == "RUNNING"
    assert not math.isnan(status.loss)
    client.close()


def test_status_json_fields_survive_in_etcd(cluster):
    """The job record in etcd carries what a new leader needs (written on events only)."""
    c = cluster(ps=1, agents=1)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=50))
    client.wait(job_id, timeout=60, interval=0.2)
    record = json.loads(c.client.get(c.keys.job_status(job_id)).value)
    assert record["state"] == "COMPLETED"
    assert record["checkpoint"].endswith("MANIFEST.json")
    assert record["step"] == 50
    client.close()
