"""`elasticd submit --resume-from`: a failed job revived from its newest verified checkpoint.

A real local cluster. The first job fails for real (its training process is
SIGKILLed and max_restarts is 0). A new job submitted with --resume-from
starts from that job's newest checkpoint, not from a fresh model, and
completes. A checkpoint that does not exist or holds another model is refused
at submit with a message naming the problem, and no job is created.
"""

from __future__ import annotations

import grpc
import pytest

from elasticd.checkpoint import CheckpointStore
from elasticd.cli import main as cli
from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import spec_yaml
from tests.test_local_cluster import processes_of_job
from tests.test_ps_failures import ENDLESS, start
from tests.test_ps_restore import record


def test_a_failed_job_is_revived_from_its_newest_checkpoint(cluster, tmp_path, capsys):
    c = cluster(ps=2, agents=1)
    client, failed = start(c, steps=ENDLESS, checkpoint={"every_steps": 40})
    try:
        wait_until(lambda: record(c, failed).checkpoint_step >= 80, 90, "two checkpoints")
        for proc in processes_of_job(failed):
            proc.kill()
        wait_until(lambda: record(c, failed).state == "FAILED", 60, "the job to fail")
        store = CheckpointStore(str(c.base_dir / "checkpoints"))
        newest = store.latest(failed)
        assert newest is not None and newest.step >= 80

        steps = newest.step + 200
        spec = tmp_path / "revive.yaml"
        spec.write_text(spec_yaml(steps=steps, report_every_steps=5, max_restarts=0))
        code = cli(["submit", str(spec), "--resume-from", failed, "--etcd", c.etcd,
                    "--prefix", c.prefix])  # fmt: skip
        assert code == 0
        revived = capsys.readouterr().out.split()[-1]
        final = wait_until(
            lambda: (r := record(c, revived)).state in ("COMPLETED", "FAILED") and r,
            120,
            "the revived job to end",
        )
        assert (final.state, final.step) == ("COMPLETED", steps), final.message
        assert final.restored_step == newest.step
        assert final.restored_from == store.url_of(newest)
        assert final.updates_lost == 0
    finally:
        client.close()


REFUSED = [  # (spec fields, what --resume-from names (None: a checkpointed job), problem)
    ({}, "t-000000", "t-000000 has no verified checkpoint"),
    ({}, "file:///nowhere/t-000000/000000000040", "no committed checkpoint at"),
    ({"task": "charlm.py"}, None, "does not fit this model: parameter"),
    ({"optimizer": {"name": "adam", "lr": 0.01}}, None, "holds sgd optimizer state"),
]


def test_a_checkpoint_that_cannot_be_resumed_is_refused_at_submit(cluster):
    c = cluster(ps=1, agents=1)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        source = client.submit_yaml(spec_yaml(steps=60, checkpoint={"every_steps": 20}))
        wait_until(lambda: record(c, source).state == "COMPLETED", 90, "a checkpointed job")
        before = {j.job_id for j in client.list()}
        for fields, ref, problem in REFUSED:
            with pytest.raises(grpc.RpcError) as err:
                client.submit_yaml(spec_yaml(**fields), resume_from=ref or source)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, ref)
            assert problem in err.value.details(), err.value.details()
        assert {j.job_id for j in client.list()} == before  # no job was created
    finally:
        client.close()
