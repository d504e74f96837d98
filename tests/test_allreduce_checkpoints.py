"""Checkpoints in allreduce mode, and restores across modes, bit for bit.

One real local cluster (etcd, controller, two PS, two agents) runs three jobs
in a chain:

1. an allreduce job whose two ranks each write their slice of the replica
   every 20 steps; the controller commits a manifest once both did;
2. a ps-async job submitted with ``--resume-from`` the first: its PS tier is
   restored from the allreduce checkpoint, and what the servers hold equals
   that checkpoint bit for bit;
3. an allreduce job resumed from the ps-async job's checkpoint: its replica
   starts from that checkpoint, bit for bit.
"""

from __future__ import annotations

import re

import grpc
import pytest

from elasticd.checkpoint import CheckpointStore
from elasticd.checkpoint.locate import load_state, saved_placement
from elasticd.client import JobClient
from elasticd.local import LocalCluster
from elasticd.placement import ShardPlacement
from elasticd.retry import wait_until
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.server.controller.restore import tier_digest
from elasticd.worker.runtime.handover import Handover
from tests.jobs import spec_yaml
from tests.test_ps_restore import record

COMMON = {
    "workers": {"min": 2, "max": 2},
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "task_args": {"in_features": 32},
    "checkpoint": {"every_steps": 20},
    "report_every_steps": 5,
    "max_restarts": 0,
}


def completed(c: LocalCluster, job_id: str, steps: int):
    final = wait_until(
        lambda: (r := record(c, job_id)).state in ("COMPLETED", "FAILED", "CANCELLED") and r,
        180,
        f"job {job_id} to end",
    )
    assert (final.state, final.step) == ("COMPLETED", steps), final.message
    return final


def logs_of(c: LocalCluster, *names: str) -> str:
    return "".join((c.base_dir / "logs" / n).read_text() for n in names)


def test_allreduce_checkpoints_restore_into_ps_async_and_back(cluster):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    store = CheckpointStore(str(c.base_dir / "checkpoints"))
    try:
        # 1. allreduce, sharded by rank.
        ar = client.submit_yaml(spec_yaml(mode="allreduce", steps=60, **COMMON))
        completed(c, ar, 60)
        first = wait_until(
            lambda: (r := record(c, ar)).checkpoint_step == 60 and r, 60, "the last checkpoint"
        )
        manifests = store.list_manifests(ar)
        steps = sorted(m.step for m in manifests)
        # A trigger that comes while the rank's previous upload is still being
        # written is skipped, by design, and logged: on a loaded machine the
        # upload of step 20 can outlast the 20 steps to the next trigger.
        worker_logs = "".join(p.read_text() for p in (c.base_dir / "logs" / ar).glob("*.log"))
        for missing in sorted({20, 40, 60} - set(steps)):
            assert re.search(rf"event=checkpoint_skipped job={ar} step={missing}\b", worker_logs)
        assert set(steps) <= {20, 40, 60} and 60 in steps and len(steps) >= 2, steps
        for m in manifests:
            assert m.extra["mode"] == "allreduce" and store.verify(m)
            assert sorted(s.name for s in m.shards) == ["rank-0", "rank-1"]
            assert m.extra["position"] == 2 * m.step  # two batches a step
            assert saved_placement(m).groups == ["rank-0", "rank-1"]
        newest = store.latest(ar)
        assert newest.step == 60 and first.checkpoint == store.url_of(newest)
        params, named = load_state(store, newest)
        assert named and all("momentum_buffer" in v for v in named.values())

        # 2. into ps-async: the PS tier holds exactly the allreduce checkpoint.
        ps = client.submit_yaml(spec_yaml(steps=100, **COMMON), resume_from=ar)
        second = completed(c, ps, 100)
        assert (second.restored_step, second.restored_from) == (60, store.url_of(newest))
        placement = ShardPlacement.from_json(c.client.get(c.keys.placement(ps)).value)
        restored = re.search(
            rf"event=job_restored job={ps} generation=\d+ step=60 .* digest=(\w+)",
            logs_of(c, "controller-0.log"),
        )
        assert restored and restored.group(1) == tier_digest(placement, params, named)

        # 3. and back into allreduce: the replica starts from the ps-async checkpoint.
        back_from = store.latest(ps)
        assert back_from.step == 100 and back_from.extra["mode"] == "ps-async"
        expected = Handover(*load_state(store, back_from), back_from.step, back_from.step)
        back = client.submit_yaml(spec_yaml(mode="allreduce", steps=140, **COMMON), resume_from=ps)
        completed(c, back, 140)
        worker_logs = logs_of(c, f"{back}/node-0.0.log") + logs_of(c, f"{back}/node-1.0.log")
        loaded = re.findall(
            r"event=replica_restored step=(\d+) position=\d+ digest=(\w+)", worker_logs
        )
        assert loaded == [("100", expected.digest())]
        assert store.latest(back).step == 140

        # A report that describes no slice of a checkpoint is refused and changes nothing.
        with grpc.insecure_channel(c.leader()) as channel:
            stub = job_pb2_grpc.TrainingCoordinatorStub(channel)
            good = dict(job_id=back, worker_id="node-0.0", generation=1, world_size=2, step=160,
                        position=320, url=str(c.base_dir / "checkpoints"), path="x", sha256="0" * 64, size=1)  # fmt: skip
            for bad, problem in (
                ({"rank": 2, "name": "rank-2"}, "not in a world of 2"),
                ({"rank": 0, "name": "rank-1"}, "must name its shard rank-0"),
                ({"rank": 0, "name": "rank-0", "job_id": ps}, "trains in ps-async"),
                ({"rank": 0, "name": "rank-0", "url": "memory://x"}, "checkpoint store"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ReportShard(job_pb2.ShardWritten(**{**good, **bad}), timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert problem in err.value.details()
        assert [m.step for m in store.list_manifests(back)][-1] == 140
    finally:
        client.close()
