"""Raising ``workers.min`` above the workers a job has: it stops stepping, and goes on later.

An allreduce job trains on two nodes with ``workers.min: 2``. ``elasticd scale``
raises the minimum to 3, which the two nodes cannot give: the job must wait,
and its processes must stop at a step boundary and wait outside any group,
keeping their replicas, instead of training on in the generation the job left.
Scaled back to 2, the same processes form the next generation from the step
they stopped at, and the job consumes batches 0, 1, 2, ... each exactly once
(tests/tasks/batch_counter.py counts them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from elasticd.client import JobClient
from elasticd.retry import wait_until
from elasticd.worker.runtime.control import Assignment
from tests.fixtures.batch_counts import TASK, applied_counts, assert_prefix_once
from tests.jobs import spec_yaml

STEPS = 60  # a step consumes one batch per worker


def spec(slow: Path) -> dict:
    return {
        "task": str(TASK),
        "mode": "allreduce",
        "steps": STEPS,
        "workers": {"min": 2, "max": 2},
        # lr 1 over gradients averaged on 2 workers: every batch applied takes 0.5 off its slot
        "optimizer": {"name": "sgd", "lr": 1.0},
        # slow while the file exists: the job is still training when it is scaled
        "task_args": {
            "batches": 2 * STEPS,
            "step_delay_s": 0.01,
            "slow": str(slow),
            "slow_step_s": 0.1,
        },
        "report_every_steps": 5,
        "max_restarts": 0,
    }


def waiting_at(log: str, job_id: str) -> tuple[int, int] | None:
    """(generation, step) at which a worker stopped outside a generation, from its log."""
    m = re.search(rf"event=outside_generation job={job_id} generation=(\d+) .*step=(\d+)", log)
    return (int(m[1]), int(m[2])) if m else None


def test_an_assignment_that_leaves_the_process_out_has_no_rank() -> None:
    message = {"generation": 2, "world_size": 0, "members": [], "worker_id": "a.0"}
    a = Assignment.from_message(
        {"assignment": {**message, "job_id": "job", "spec": {}, "controller": "c:1"}}
    )
    assert (a.member, a.rank, a.generation, a.world_size) == (False, -1, 2, 0)


@pytest.mark.slow
def test_scaling_min_above_the_workers_holds_allreduce_steps_until_scaled_back(cluster, tmp_path):
    slow = tmp_path / "slow"
    slow.touch()
    c = cluster(ps=0, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    logs = c.base_dir / "logs"
    try:
        job_id = client.submit_yaml(spec_yaml(**spec(slow)))
        both = wait_until(
            lambda: len((s := client.get(job_id)).workers) == 2 and s.step >= 5 and s,
            120,
            "step 5 with both workers",
        )
        workers = sorted(w.worker_id for w in both.workers)
        paths = [logs / job_id / f"{w}.log" for w in workers]
        client.scale(job_id, 3, 3)
        wait_until(lambda: client.get(job_id).state == "WAITING", 30, "the job to wait")
        held = wait_until(
            lambda: all(ats := [waiting_at(p.read_text(), job_id) for p in paths]) and ats,
            30,
            "both workers to stop outside the job's generation",
        )
        slow.unlink()  # what comes after the hold may run at full speed
        waiting = client.get(job_id)
        client.scale(job_id, 2, 2)
        final = client.wait(job_id, timeout=120, interval=0.5)
    finally:
        client.close()
    assert waiting.state == "WAITING" and waiting.step < STEPS, waiting
    assert (final.state, final.step) == ("COMPLETED", STEPS), final
    # Both stopped after the same step, in the generation the job sealed empty.
    assert len(set(held)) == 1, f"held at {held}"
    (empty, step), texts = held[0], [p.read_text() for p in paths]
    assert 0 < step < STEPS, step
    for worker, text in zip(workers, texts, strict=True):
        outside = text.index("event=outside_generation")
        after = text[outside:]
        # No step while the job waited: the next thing it did was join a newer group,
        # from the step it held (nothing lost, nothing repeated).
        assert "event=step " not in after.split("event=group_formed")[0], (worker, after[:2000])
        synced = re.search(r"event=state_synced .*generation=(\d+) .*had_step=(\d+) ", after)
        assert synced and int(synced[1]) > empty and int(synced[2]) == step, (worker, synced)
    # Two workers at every step: batches 0 .. 2 * STEPS - 1, each applied once.
    counts = applied_counts(c.base_dir / "checkpoints", job_id, 0.5)
    assert assert_prefix_once(counts) == 2 * STEPS
