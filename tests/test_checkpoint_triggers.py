"""When checkpoints are taken, and how many are kept: by time, on request, at cancel; `keep`."""

from __future__ import annotations

import re

import grpc
import pytest

from elasticd.checkpoint import CheckpointStore
from elasticd.cli import main as cli
from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import EXAMPLES, spec_yaml
from tests.test_ps_failures import ENDLESS, start
from tests.test_ps_restore import record


def test_checkpoints_by_time_on_request_and_at_cancel_keeping_the_newest(cluster, capsys):
    c = cluster(ps=2, agents=1)
    client, job_id = start(c, steps=ENDLESS, checkpoint={"every_s": 0.5, "keep": 2})
    store = CheckpointStore(str(c.base_dir / "checkpoints"))
    try:
        seen: set[int] = set()

        def three_by_time() -> bool:
            seen.add(record(c, job_id).checkpoint_step)
            return len(seen - {0}) >= 3

        wait_until(three_by_time, 90, "three checkpoints taken by time (every_s)")
        kept = wait_until(
            lambda: len(ms := store.list_manifests(job_id)) == 2 and ms, 30, "older ones pruned"
        )
        assert all(store.verify(m) for m in kept)

        # On request: `elasticd checkpoint JOB`.
        before = record(c, job_id).checkpoint_step
        wait_until(lambda: client.get(job_id).step > before + 5, 60, "progress")
        assert cli(["checkpoint", job_id, "--etcd", c.etcd, "--prefix", c.prefix]) == 0
        taken = re.search(r"checkpoint=\S+/(\d{12})/MANIFEST.json", capsys.readouterr().out)
        assert taken and int(taken.group(1)) > before
        assert record(c, job_id).checkpoint_step > before

        # At cancel: the state the job reached is kept, for --resume-from.
        before = record(c, job_id).checkpoint_step
        wait_until(lambda: client.get(job_id).step > before + 5, 60, "progress")
        assert client.cancel(job_id).state == "CANCELLED"
        final = record(c, job_id)
        assert final.checkpoint_step > before
        assert final.checkpoint_step in {m.step for m in store.list_manifests(job_id)}

        # An ended job has nothing to checkpoint.
        with pytest.raises(grpc.RpcError) as err:
            client.checkpoint(job_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only a running job checkpoints" in err.value.details()
    finally:
        client.close()


def test_allreduce_checkpoints_by_time_on_request_and_at_cancel(cluster, capsys):
    """The controller asks; every rank writes its slice of the same step."""
    c = cluster(ps=0, agents=2)
    client, job_id = start(
        c,
        mode="allreduce",
        workers={"min": 2, "max": 2},
        checkpoint={"every_s": 1, "keep": 3},
    )
    store = CheckpointStore(str(c.base_dir / "checkpoints"))

    def whole(step: int) -> None:
        (m,) = [m for m in store.list_manifests(job_id) if m.step == step]
        assert m.extra["mode"] == "allreduce" and m.extra["world_size"] == 2
        assert sorted(r.name for r in m.shards) == ["rank-0", "rank-1"]
        assert store.verify(m)

    try:
        seen: set[int] = set()

        def two_by_time() -> bool:
            seen.add(record(c, job_id).checkpoint_step)
            return len(seen - {0}) >= 2

        wait_until(two_by_time, 90, "two checkpoints taken by time (every_s)")
        whole(record(c, job_id).checkpoint_step)

        # On request: `elasticd checkpoint JOB`.
        before = record(c, job_id).checkpoint_step
        wait_until(lambda: client.get(job_id).step > before + 5, 60, "progress")
        assert cli(["checkpoint", job_id, "--etcd", c.etcd, "--prefix", c.prefix]) == 0
        taken = re.search(r"checkpoint=\S+/(\d{12})/MANIFEST.json", capsys.readouterr().out)
        assert taken and int(taken.group(1)) > before
        whole(int(taken.group(1)))

        # At cancel: the state the job reached is kept, for --resume-from.
        before = record(c, job_id).checkpoint_step
        wait_until(lambda: client.get(job_id).step > before + 5, 60, "progress")
        assert client.cancel(job_id).state == "CANCELLED"
        final = record(c, job_id)
        assert final.checkpoint_step > before
        whole(final.checkpoint_step)
    finally:
        client.close()


def test_a_script_job_is_refused_a_checkpoint_it_cannot_take(cluster, tmp_path):
    c = cluster(ps=0, agents=1)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        script = {
            "path": str(EXAMPLES / "torchrun_script.py"),
            "args": ["--snapshot", str(tmp_path / "snap.pt"), "--steps", "100000"],
        }
        job_id = client.submit_yaml(
            spec_yaml(mode="script", script=script, workers={"min": 1, "max": 1})
        )
        wait_until(lambda: client.get(job_id).state == "RUNNING", 60, "the job to run")
        with pytest.raises(grpc.RpcError) as err:
            client.checkpoint(job_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only ps-async and allreduce jobs checkpoint" in err.value.details()
        client.cancel(job_id)
    finally:
        client.close()
