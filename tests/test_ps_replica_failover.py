"""Hot replicas on a whole local cluster: a PS is SIGKILLed and nothing is lost.

Two jobs with the same spec (synchronous PS, ``ps.replicas: 2``) run one after
the other on one cluster of three PS. The first runs without faults; in the
second a PS is SIGKILLed mid-job, while a worker's push surely waits in a
synchronous round (its peer is SIGSTOPped first, so the round cannot close).
The backups of the lost PS's groups take over, the groups left without a
backup get one, the waiting worker sends its push again, and the job
completes with parameters and optimizer state bit for bit equal to the
fault-free run: no acknowledged update was lost, none was applied twice, and
no worker skipped a batch.
"""

from __future__ import annotations

import signal
import time

import psutil
import torch

from elasticd.checkpoint import CheckpointStore
from elasticd.checkpoint.locate import load_state
from elasticd.client import JobClient
from elasticd.local import LocalCluster
from elasticd.placement import ShardPlacement
from elasticd.retry import wait_until
from tests.jobs import spec_yaml
from tests.test_local_cluster import processes_of_job
from tests.test_ps_failures import StateLog
from tests.test_ps_restore import record
from tests.test_ps_service import bitwise_equal

STEPS = 800
SPEC = {
    "steps": STEPS,
    "report_every_steps": 5,
    "max_restarts": 0,
    "workers": {"min": 2, "max": 2},
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "ps": {"max_staleness": 0, "replicas": 2},
    "task_args": {"in_features": 64},
}


def finished(c: LocalCluster, job_id: str):
    return wait_until(
        lambda: (r := record(c, job_id)).state in ("COMPLETED", "FAILED", "CANCELLED") and r,
        240,
        "the job to end",
    )


def final_state(c: LocalCluster, job_id: str) -> tuple[int, dict, dict]:
    store = CheckpointStore(str(c.base_dir / "checkpoints"))
    manifest = store.latest(job_id)
    params, named = load_state(store, manifest)
    return manifest.step, params, named


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], dict):
            assert_bitwise_equal(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and bitwise_equal(a[k], b[k]), f"{what}.{k} differs"
        else:
            assert a[k] == b[k], f"{what}.{k}: {a[k]!r} != {b[k]!r}"


def worker_process(job_id: str, worker_id: str) -> psutil.Process:
    (p,) = processes_of_job(job_id, worker_id)
    return p


def still(client: JobClient, job_id: str, quiet_s: float = 1.0) -> int | None:
    """The job's step once it stopped moving for ``quiet_s`` seconds (None while it moves)."""
    before = client.get(job_id).step
    time.sleep(quiet_s)
    after = client.get(job_id).step
    return after if after == before else None


def placement_of(c: LocalCluster, job_id: str) -> ShardPlacement:
    return ShardPlacement.from_json(c.client.get(c.keys.placement(job_id)).value)


def test_a_sigkilled_ps_loses_no_update_with_hot_replicas(cluster):
    c = cluster(ps=3, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        clean = client.submit_yaml(spec_yaml(**SPEC))
        done = finished(c, clean)
        assert (done.state, done.step) == ("COMPLETED", STEPS), done.message
        expected = final_state(c, clean)
        placed = placement_of(c, clean)
        assert placed.replicated
        victim = placed.holders(placed.groups[0])[0]  # a primary, and some group's backup

        job_id = client.submit_yaml(spec_yaml(**SPEC))
        states = StateLog(c, job_id)
        try:
            wait_until(lambda: client.get(job_id).step >= 200, 120, "training under way")
            peer = worker_process(job_id, "node-1.0")
            peer.send_signal(signal.SIGSTOP)
            try:
                # node-0.0 pushes into rounds that wait for its stopped peer: it stops too.
                stuck = wait_until(lambda: still(client, job_id), 60, "the rounds to stall")
                c.kill(victim, signal.SIGKILL)
                moved = wait_until(
                    lambda: victim not in (p := placement_of(c, job_id)).ps_ids and p,
                    60,
                    "the failover",
                )
            finally:
                peer.send_signal(signal.SIGCONT)
            final = finished(c, job_id)
        finally:
            states.close()
        assert (final.state, final.step) == ("COMPLETED", STEPS), final.message
        assert "FAILED" not in states.seen()
        # From memory, not from storage: nothing restored, nothing lost.
        assert (final.restored_generation, final.updates_lost) == (0, 0)
        # Every group kept its slices and has a backup again on the two live servers.
        assert moved.groups == placed.groups
        assert all(moved.holders(g)[1] for g in moved.groups)
        assert moved.ps_ids == sorted(set(placed.ps_ids) - {victim})
        # `elasticd status` shows each live PS with its primary and backup bytes.
        status = client.get(job_id)
        assert {h.ps_id: (h.bytes, h.backup_bytes) for h in status.ps} == {
            p: (moved.bytes_per_ps()[p], moved.backup_bytes_per_ps().get(p, 0))
            for p in moved.ps_ids
        }
        assert sum(h.backup_bytes for h in status.ps) == sum(s.nbytes for s in moved.slices)
        log = "".join((c.base_dir / "logs" / f"{p}.log").read_text() for p in moved.ps_ids)
        assert "event=shard_configured" in log and "event=shard_imported" in log

        got = final_state(c, job_id)
        assert got[0] == expected[0] == STEPS
        assert_bitwise_equal(expected[1], got[1], "parameters")
        assert_bitwise_equal(expected[2], got[2], "optimizer state")
        # The push that waited when the PS died was sent again, after the failover.
        worker_log = (c.base_dir / "logs" / job_id / "node-0.0.log").read_text()
        assert "event=push_again" in worker_log.split("generation=2", 1)[1]
        assert stuck < STEPS

    finally:
        client.close()
