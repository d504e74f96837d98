"""Exactly-once data in ps-async: every batch of an epoch is applied once, whatever fails.

A real local cluster (etcd, controller, two PS, two agents) trains the batch
counter task (tests/tasks/batch_counter.py): its parameters count, slot by
slot, how often each batch index was applied, on each of the two PS. One
epoch is the job: ``steps`` batches, handed out by the controller in leased
ranges. During the run three training processes are SIGKILLed, half-way
through their ranges, and then a PS is SIGKILLed with no replica, so the job
is restored from its newest checkpoint onto the surviving PS. The final
parameters must show every batch applied exactly once on both shards: none
lost with a killed worker or the rolled-back state, none applied twice by the
worker that took over a range.
"""

from __future__ import annotations

import json
import signal

from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.fixtures.batch_counts import TASK, applied_counts, assert_each_batch_once
from tests.jobs import spec_yaml
from tests.test_local_cluster import processes_of_job
from tests.test_ps_failures import StateLog
from tests.test_ps_restore import record

BATCHES = 480
SPEC = {
    "task": str(TASK),
    "steps": BATCHES,
    "task_args": {"batches": BATCHES, "step_delay_s": 0.02},
    "workers": {"min": 1, "max": 2},
    "optimizer": {"name": "sgd", "lr": 1.0},
    "ps": {"max_staleness": 2},
    "data": {"shard_batches": 16, "epoch_batches": BATCHES},
    "checkpoint": {"every_steps": 40},
    "report_every_steps": 5,
    "max_restarts": 5,
}


def kill_training_process(job_id: str, worker_id: str) -> int:
    (p,) = wait_until(lambda: processes_of_job(job_id, worker_id), 60, f"{worker_id} running")
    p.send_signal(signal.SIGKILL)
    return p.pid


def test_every_batch_is_applied_once_through_kills_and_a_restore(cluster, tmp_path):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(**SPEC))
    states = StateLog(c, job_id)
    faults = []
    try:
        for n, (at, worker) in enumerate(((60, "node-0.0"), (120, "node-1.0"), (180, "node-0.0"))):
            wait_until(lambda a=at: client.get(job_id).step >= a, 120, f"step {at}")
            pid = kill_training_process(job_id, worker)
            faults.append({"fault": n, "what": "SIGKILL", "worker": worker, "pid": pid, "at": at})
        checkpointed = wait_until(
            lambda: (r := record(c, job_id)).checkpoint_step >= 200 and r, 120, "a checkpoint"
        )
        c.kill("ps-1", signal.SIGKILL)
        faults.append({"what": "SIGKILL", "ps": "ps-1", "after": checkpointed.checkpoint_step})
        final = wait_until(
            lambda: (r := record(c, job_id)).state in ("COMPLETED", "FAILED", "CANCELLED") and r,
            240,
            "the job to end",
        )
    finally:
        states.close()
        client.close()
    assert (final.state, final.step) == ("COMPLETED", BATCHES), final.message
    assert final.restored_generation > 0 and final.restored_from, "no restore happened"

    counts = applied_counts(c.base_dir / "checkpoints", job_id)
    # the record of this run: every fault, and how often each batch was applied on each shard
    (tmp_path / "applied.json").write_text(json.dumps({"faults": faults, "counts": counts}))
    assert_each_batch_once(counts, BATCHES)

    controller_log = (c.base_dir / "logs" / "controller-0.log").read_text()
    assert "event=data_reclaimed" in controller_log  # a killed worker's range went back
    worker_logs = "".join(p.read_text() for p in (c.base_dir / "logs" / job_id).glob("*.log"))
    assert worker_logs.count("event=data_leased") > BATCHES // 16
