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

The same with hot replicas (``ps.replicas: 2``) on two PS, where the only PS
left already holds the drained primary's backup; and with no other PS at all,
where the PS stops at once, the job waits for a PS and is restored from its
newest checkpoint when one registers.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from elasticd.client import JobClient
from elasticd.local import LocalCluster
from elasticd.retry import wait_until
from elasticd.server.ps.drain import DrainView, next_step
from tests.fixtures.batch_counts import applied_counts, assert_each_batch_once
from tests.jobs import spec_yaml
from tests.test_drain import BATCHES, SPEC
from tests.test_ps_replica_failover import finished, placement_of
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


def stop(c: LocalCluster, ps_id: str) -> int:
    """SIGTERM to a PS, as ``systemctl stop`` sends it; its exit code."""
    popen = c.procs[ps_id].popen
    os.killpg(popen.pid, signal.SIGTERM)
    return popen.wait(timeout=90)  # inside the unit's TimeoutStopSec


def assert_drained(c: LocalCluster, ps_id: str, code: int, how: str = "event=ps_drained") -> str:
    """The PS exited 0 and its log says ``how`` it ended; returns its log."""
    ps_log = c.procs[ps_id].log_path.read_text()
    assert code == 0, f"the drained PS exited {code}:\n{ps_log[-3000:]}"
    assert how in ps_log, ps_log[-3000:]
    return ps_log


def slowed(slow: Path) -> dict:
    """SPEC, with every batch taking 1 s while ``slow`` exists: the job outlasts a drain."""
    return {**SPEC, "task_args": {**SPEC["task_args"], "slow": str(slow), "slow_step_s": 1.0}}


def test_sigterm_to_a_ps_moves_its_group_and_loses_no_update(cluster):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        job_id = client.submit_yaml(spec_yaml(**SPEC))
        wait_until(lambda: client.get(job_id).step >= 40, 120, "step 40")
        placed = placement_of(c, job_id)
        victim = placed.holders(placed.groups[0])[0]
        code = stop(c, victim)
        moved = placement_of(c, job_id)
        final = finished(c, job_id)
    finally:
        client.close()
    assert_drained(c, victim, code)
    controller_log = (c.base_dir / "logs" / "controller-0.log").read_text()
    assert "event=group_moved" in controller_log
    assert victim not in moved.ps_ids and moved.groups == placed.groups
    assert (final.state, final.step) == ("COMPLETED", BATCHES), final.message
    # From memory, not from storage: nothing restored, nothing lost.
    assert (final.restored_generation, final.updates_lost) == (0, 0)
    assert_each_batch_once(applied_counts(c.base_dir / "checkpoints", job_id), BATCHES)


@pytest.mark.slow
def test_sigterm_to_a_ps_with_hot_replicas_loses_no_update(cluster, tmp_path):
    """Two PS, ``ps.replicas: 2``: each holds one group's primary and the other's backup,
    so the drained PS's primary has nowhere to move but its backup, which takes over."""
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    slow = tmp_path / "slow"
    spec = {**slowed(slow), "ps": {**SPEC["ps"], "replicas": 2}}
    try:
        job_id = client.submit_yaml(spec_yaml(**spec))
        wait_until(lambda: client.get(job_id).step >= 40, 120, "step 40")
        slow.touch()
        placed = placement_of(c, job_id)
        assert placed.replicated and all(placed.holders(g)[1] for g in placed.groups)
        victim = placed.holders(placed.groups[0])[0]
        code = stop(c, victim)
        moved = placement_of(c, job_id)
        slow.unlink()
        final = finished(c, job_id)
    finally:
        client.close()
    assert_drained(c, victim, code)
    controller_log = (c.base_dir / "logs" / "controller-0.log").read_text()
    assert "event=group_moved" in controller_log and "event=failed_over" not in controller_log
    # The other PS serves both groups now, its former backup copy overwritten by the
    # drained primary's; neither has a backup until another PS registers.
    (survivor,) = set(placed.ps_ids) - {victim}
    assert moved.groups == placed.groups
    assert [moved.holders(g) for g in moved.groups] == [(survivor, "")] * len(moved.groups)
    assert (final.state, final.step) == ("COMPLETED", BATCHES), final.message
    assert (final.restored_generation, final.updates_lost) == (0, 0)
    assert_each_batch_once(applied_counts(c.base_dir / "checkpoints", job_id), BATCHES)


@pytest.mark.slow
def test_sigterm_to_the_last_ps_stops_it_at_once_and_the_job_restores(cluster, tmp_path):
    """No other PS can take the groups: the PS does not wait for a move that cannot
    happen. It stops at once and says why; the job stops training and waits, saying
    so, and once a PS registers it is restored from its newest checkpoint: the updates
    since that checkpoint are counted as lost and trained again, and every batch ends
    applied exactly once."""
    c = cluster(ps=1, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    slow = tmp_path / "slow"
    spec = slowed(slow)
    try:
        job_id = client.submit_yaml(spec_yaml(**spec))
        checkpointed = wait_until(
            lambda: (r := record(c, job_id)).checkpoint_step >= 40 and r, 120, "a checkpoint"
        )
        slow.touch()
        # Some updates past the newest checkpoint (the next is 40 slow steps away).
        at = wait_until(
            lambda: (s := client.get(job_id).step) >= checkpointed.checkpoint_step + 3 and s,
            60,
            "updates past the checkpoint",
        )
        code = stop(c, "ps-0")
        waiting = wait_until(
            lambda: "waiting for a parameter server" in (r := record(c, job_id)).message and r,
            60,
            "the job to wait for a PS",
        )
        slow.unlink()
        c.start_ps("ps-1")
        final = finished(c, job_id)
    finally:
        client.close()
    ps_log = assert_drained(c, "ps-0", code, "event=ps_drain_stopped ps=ps-0 groups=1 other_ps=0")
    assert "reason=nobody can take the groups" in ps_log and "event=ps_drained" not in ps_log
    assert waiting.state == "WAITING", waiting  # neither failed nor training
    assert (final.state, final.step) == ("COMPLETED", BATCHES), final.message
    assert final.restored_from and final.restored_generation > 0, "no restore happened"
    # the newest checkpoint when the PS stopped (the next is 40 slow steps away)
    assert final.restored_step == checkpointed.checkpoint_step
    # the updates since that checkpoint, trained again
    assert final.updates_lost >= at - checkpointed.checkpoint_step > 0
    assert_each_batch_once(applied_counts(c.base_dir / "checkpoints", job_id), BATCHES)
