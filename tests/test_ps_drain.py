"""Graceful drain of a PS: SIGTERM moves its groups to another PS before it exits.

The decisions first, as plain functions: what a draining PS does next, and
that the controller seals a generation moving a draining PS's groups (and
places nothing new on it).

Then a real local cluster (etcd, controller, two PS without replicas, two
agents) trains the batch counter task (tests/tasks/batch_counter.py) in
ps-async. Half-way through, the PS holding one group gets SIGTERM, as
``systemctl stop`` sends it. Its group must move whole (version, optimizer
state, applied batches) to the other PS over gRPC, the PS must exit 0, and
the job must complete with every batch applied exactly once, nothing
restored from storage and no update lost.
"""

from __future__ import annotations

import os
import signal

import pytest

from elasticd.client import JobClient
from elasticd.retry import wait_until
from elasticd.server.ps.drain import DrainView, next_step
from tests.jobs import spec_yaml
from tests.test_drain import BATCHES, SPEC, applied_counts
from tests.test_ps_replica_failover import placement_of
from tests.test_ps_restore import record


@pytest.mark.parametrize(
    ("groups", "takers", "leader", "elapsed", "step"),
    [
        (1, 1, True, 1.0, "wait"),  # the controller is moving the groups
        (0, 1, True, 1.0, "leave"),  # nothing held any more
        (1, 0, True, 0.0, "stop_now"),  # no other PS: nobody can take them
        (1, 1, False, 0.0, "stop_now"),  # no controller leads: nobody will move them
        (1, 1, True, 60.0, "stop_now"),  # timed out
    ],
)
def test_what_a_draining_ps_does_next(groups, takers, leader, elapsed, step) -> None:
    assert next_step(DrainView(groups, takers, leader, elapsed, 60.0)) == step


def test_sigterm_to_a_ps_moves_its_group_and_loses_no_update(cluster):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        job_id = client.submit_yaml(spec_yaml(**SPEC))
        wait_until(lambda: client.get(job_id).step >= 40, 120, "step 40")
        placed = placement_of(c, job_id)
        victim = placed.holders(placed.groups[0])[0]
        popen = c.procs[victim].popen
        os.killpg(popen.pid, signal.SIGTERM)
        code = popen.wait(timeout=60)
        moved = placement_of(c, job_id)
        final = wait_until(
            lambda: (r := record(c, job_id)).state in ("COMPLETED", "FAILED", "CANCELLED") and r,
            180,
            "the job to end",
        )
    finally:
        client.close()
    ps_log = c.procs[victim].log_path.read_text()
    assert code == 0, f"the drained PS exited {code}:\n{ps_log[-3000:]}"
    assert "event=ps_drained" in ps_log, ps_log[-3000:]
    controller_log = (c.base_dir / "logs" / "controller-0.log").read_text()
    assert "event=group_moved" in controller_log
    assert victim not in moved.ps_ids and moved.groups == placed.groups
    assert (final.state, final.step) == ("COMPLETED", BATCHES), final.message
    # From memory, not from storage: nothing restored, nothing lost.
    assert (final.restored_generation, final.updates_lost) == (0, 0)
    for name, per_batch in applied_counts(c, job_id).items():
        assert per_batch == [1] * BATCHES, (
            f"shard {name}: batches lost {[i for i, n in enumerate(per_batch) if n == 0]}, "
            f"applied twice {[i for i, n in enumerate(per_batch) if n > 1]}"
        )
