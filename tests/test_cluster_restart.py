"""The whole local cluster is SIGKILLed, etcd included, and started again on the same --dir.

Every job that was running resumes from its newest verified checkpoint without
being submitted again, and completes at its step count. A ps-async job's
parameter servers hold that checkpoint's state bit for bit; an allreduce job's
replica starts from it bit for bit (its ranks wrote it, no PS took part).
"""

from __future__ import annotations

import json
import re
import signal

import pytest

from elasticd.checkpoint import CheckpointStore
from elasticd.checkpoint.locate import load_state
from elasticd.client import JobClient
from elasticd.local import LocalCluster
from elasticd.placement import ShardPlacement
from elasticd.retry import wait_until
from elasticd.server.controller.restore import tier_digest
from elasticd.worker.runtime.handover import Handover
from tests.fixtures.cluster import LEASE_TTL_S
from tests.jobs import spec_yaml
from tests.test_ps_restore import record
from tests.test_restore_tier import checkpoint_state

pytestmark = pytest.mark.slow  # whole clusters or many processes: run first (conftest)

STEPS = 600


def local_cluster(base_dir) -> LocalCluster:
    c = LocalCluster(base_dir, lease_ttl=LEASE_TTL_S, join_window=0.5, threads_per_worker=1)
    c.start_etcd()
    return c.start(ps=2, agents=2)


def kill_everything(c: LocalCluster) -> None:
    for name in list(c.procs):
        if c.procs[name].alive():
            c.kill(name, signal.SIGKILL)
    c.etcd_server.stop(signal.SIGKILL)
    c.stop()  # closes the client; every process is gone already


def test_a_sigkilled_cluster_started_again_resumes_its_job(tmp_path):
    base = tmp_path / "state"
    first = local_cluster(base)
    try:
        client = JobClient(etcd=first.etcd, prefix=first.prefix)
        spec = {"steps": STEPS, "report_every_steps": 5, "max_restarts": 0}
        job_id = client.submit_yaml(spec_yaml(checkpoint={"every_steps": 40}, **spec))
        client.close()
        wait_until(lambda: record(first, job_id).checkpoint_step >= 80, 120, "two checkpoints")
    finally:
        kill_everything(first)

    store = CheckpointStore(str(base / "checkpoints"))
    newest = store.latest(job_id)
    assert newest is not None and newest.step >= 80

    # ps-1 comes back late: the new leader waits for it rather than restore onto ps-0 alone.
    # Its grace outlasts a PS start on a loaded machine: it waits for ps-1 to come back.
    second = LocalCluster(
        base, lease_ttl=LEASE_TTL_S, join_window=0.5, threads_per_worker=1, startup_grace=60
    )
    second.start_etcd()
    try:
        second.start(ps=1, agents=2)
        log_path = base / "logs" / "controller-0.log"
        waits = f"event=restore_waits_for_ps job={job_id} ps=['ps-1']"
        wait_until(lambda: waits in log_path.read_text(), 60, "the restore to wait for ps-1")
        second.start_ps("ps-1")
        restored = wait_until(
            lambda: (r := record(second, job_id)).restored_generation and r, 90, "a restore"
        )
        assert restored.restored_step == newest.step
        assert restored.restored_from == store.url_of(newest)

        # What the PS tier held right after the import is the checkpoint, bit for bit.
        log = log_path.read_text()
        held = re.search(rf"event=job_restored job={job_id} .* digest=(\w+)", log).group(1)
        placement = ShardPlacement.from_json(second.client.get(second.keys.placement(job_id)).value)
        params, named = checkpoint_state(store, newest)
        assert held == tier_digest(placement, params, named)
        assert sorted(json.loads(placement.to_json())["incarnations"]) == ["ps-0", "ps-1"]

        final = wait_until(
            lambda: (r := record(second, job_id)).state in ("COMPLETED", "FAILED") and r,
            180,
            "the job to end",
        )
        assert (final.state, final.step) == ("COMPLETED", STEPS), final.message
    finally:
        second.stop()


def test_a_sigkilled_cluster_started_again_resumes_its_allreduce_job(tmp_path):
    base = tmp_path / "state"
    first = local_cluster(base)
    spec = {"steps": STEPS, "report_every_steps": 5, "max_restarts": 0}
    try:
        client = JobClient(etcd=first.etcd, prefix=first.prefix)
        job_id = client.submit_yaml(
            spec_yaml(
                mode="allreduce",
                workers={"min": 2, "max": 2},
                checkpoint={"every_steps": 40},
                **spec,
            )
        )
        client.close()
        wait_until(lambda: record(first, job_id).checkpoint_step >= 80, 120, "two checkpoints")
    finally:
        kill_everything(first)

    store = CheckpointStore(str(base / "checkpoints"))
    newest = store.latest(job_id)
    assert newest is not None and newest.step >= 80 and newest.extra["mode"] == "allreduce"
    position = newest.extra["position"]
    expected = Handover(*load_state(store, newest), newest.step, position).digest()

    second = local_cluster(base)
    try:
        final = wait_until(
            lambda: (r := record(second, job_id)).state in ("COMPLETED", "FAILED") and r,
            180,
            "the job to end",
        )
        assert (final.state, final.step) == ("COMPLETED", STEPS), final.message
        logs = "".join(p.read_text() for p in sorted((base / "logs" / job_id).glob("*.log")))
        restored = re.findall(
            r"event=replica_restored step=(\d+) position=(\d+) digest=(\w+)", logs
        )
        assert restored == [(str(newest.step), str(position), expected)]
        assert store.latest(job_id).step == STEPS
    finally:
        second.stop()
