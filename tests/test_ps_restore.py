"""A parameter server is lost: the job is placed again and restored from its checkpoint.

Whole local clusters of real processes. A PS is SIGKILLed; it either comes
back under its id and port (as systemd's Restart= gives) or stays gone. The
job must carry on from its newest verified checkpoint, never from a fresh
slice, lose no worker to a crash (max_restarts is 0) and complete.
"""

from __future__ import annotations

import json
import signal

from elasticd.checkpoint import CheckpointStore
from elasticd.client import JobClient, format_status
from elasticd.local import LocalCluster
from elasticd.ps_control import shard_infos
from elasticd.retry import wait_until
from elasticd.server.controller.records import JobRecord
from tests.test_membership_etcd import generation
from tests.test_ps_failures import StateLog, ps_address, start

STEPS = 600
CHECKPOINT = {"every_steps": 40}


def record(c: LocalCluster, job_id: str) -> JobRecord:
    return JobRecord.from_json(c.client.get(c.keys.job_status(job_id)).value)


def checkpointed(c: LocalCluster, job_id: str) -> JobRecord:
    return wait_until(
        lambda: (r := record(c, job_id)).checkpoint_step >= 40 and r, 90, "a checkpoint"
    )


def check_restored(c: LocalCluster, job_id: str, states: StateLog, ps: list[str]) -> JobRecord:
    """The job restored from a committed, verified checkpoint onto ``ps``, then completed."""
    restored = wait_until(
        lambda: (r := record(c, job_id)).restored_generation and r, 60, "a restore"
    )
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:  # what `elasticd status JOB` shows, once the controller's cache has the restore
        status = wait_until(
            lambda: (st := client.get(job_id)).restored_from and st, 30, "status of the restore"
        )
        assert sorted(h.ps_id for h in status.ps if h.bytes > 0) == ps
        assert (status.restored_from, status.restored_step) == (
            restored.restored_from,
            restored.restored_step,
        )
        line = format_status(status)
        assert f"restored_from={restored.restored_from}" in line and "ps=" in line
    finally:
        client.close()
    store = CheckpointStore(str(c.base_dir / "checkpoints"))
    manifests = {m.step: m for m in store.list_manifests(job_id)}
    assert restored.restored_step in manifests
    assert store.url_of(manifests[restored.restored_step]) == restored.restored_from
    assert generation(c, job_id).number >= restored.restored_generation
    final = wait_until(
        lambda: (r := record(c, job_id)).state in ("COMPLETED", "FAILED", "CANCELLED") and r,
        180,
        "the job to end",
    )
    assert (final.state, final.step) == ("COMPLETED", STEPS), final.message
    assert "FAILED" not in states.seen()
    return final


def test_a_ps_restarted_under_its_id_gets_its_slices_back(cluster):
    c = cluster(ps=2, agents=2)
    client, job_id = start(c, steps=STEPS, checkpoint=CHECKPOINT)
    states = StateLog(c, job_id)
    try:
        before = checkpointed(c, job_id)
        port = int(ps_address(c, "ps-1").rsplit(":", 1)[1])
        # A restart quicker than the lease, whatever the load on this machine: the old
        # registration stays (on a lease of the test's) until the new process replaces it.
        key = c.keys.ps("ps-1")
        held = c.client.grant_lease(120)
        c.client.put(key, c.client.get(key).value, lease=held)
        c.kill("ps-1", signal.SIGKILL)
        c.start_ps("ps-1", port=port)
        final = check_restored(c, job_id, states, ["ps-0", "ps-1"])
        c.client.revoke_lease(held)
        assert final.restored_step >= before.checkpoint_step
        placement = json.loads(c.client.get(c.keys.placement(job_id)).value)
        assert sorted(placement["incarnations"]) == ["ps-0", "ps-1"]
        # The new ps-1 got its slices by import from the checkpoint, never from a fresh model.
        log = (c.base_dir / "logs" / "ps-1.log").read_text()
        after = log.split(f"incarnation={placement['incarnations']['ps-1']}", 1)[1]
        assert "event=shard_imported" in after
        assert "event=shard_created" not in after
    finally:
        states.close()
        client.close()


def test_a_ps_that_stays_gone_is_replaced_by_the_live_tier(cluster):
    c = cluster(ps=2, agents=2)
    client, job_id = start(c, steps=STEPS, checkpoint=CHECKPOINT)
    states = StateLog(c, job_id)
    try:
        checkpointed(c, job_id)
        c.kill("ps-1", signal.SIGKILL)
        final = check_restored(c, job_id, states, ["ps-0"])
        placement = json.loads(c.client.get(c.keys.placement(job_id)).value)
        assert list(placement["incarnations"]) == ["ps-0"]
        assert final.updates_lost >= 0
        # The survivor holds the whole job now, and nothing is left of it when it ends.
        wait_until(
            lambda: not shard_infos(job_id, {"ps-0": ps_address(c, "ps-0")})["ps-0"].exists,
            30,
            "the job's shard to be dropped",
        )
    finally:
        states.close()
        client.close()
