"""Owned storage on a real closed cluster: whose checkpoints a user may resume from, and
where a user may point the cluster's storage credentials (issue 25, item 7).

A local cluster with TLS and a tokens file (``root`` admin; ``alice`` and ``bob``
submit) and no ``allowed_storage``: like ``elasticd up --tls``, it allows its own
checkpoint directory only. Every refusal goes through the real gate and
controller over gRPC, and is checked to have changed nothing: no job record,
no directory, and bob's checkpoint files byte for byte as they were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from elasticd.client import JobClient
from elasticd.local import LocalCluster
from tests.fixtures.cluster import closed_cluster
from tests.jobs import spec_yaml

pytestmark = pytest.mark.slow

USERS = {"root": "admin", "alice": "submit", "bob": "submit"}
CHECKPOINTED = {"checkpoint": {"every_steps": 20}}


@pytest.fixture(scope="module")
def closed(tmp_path_factory):
    with closed_cluster(tmp_path_factory.mktemp("owned"), USERS) as c:
        yield c


@pytest.fixture(scope="module")
def clients(closed):
    made = {
        user: JobClient(
            etcd=closed.etcd, prefix=closed.prefix, security=closed.client_security(user)
        )
        for user in USERS
    }
    yield made
    for client in made.values():
        client.close()


@pytest.fixture(scope="module")
def bobs_job(clients) -> str:
    """A job of bob's, completed, with checkpoints at steps 20, 40 and 60."""
    job = clients["bob"].submit_yaml(spec_yaml(steps=60, **CHECKPOINTED))
    status = clients["bob"].wait(job, timeout=240)
    assert status.state == "COMPLETED" and status.checkpoint, status
    return job


def checkpoint_root(c: LocalCluster) -> Path:
    return c.base_dir / "checkpoints"


def digests(directory: Path) -> dict[str, str]:
    """Every file under ``directory``: its SHA-256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def job_ids(clients) -> set[str]:
    return {j.job_id for j in clients["root"].list()}


def refused(client: JobClient, text: str, resume_from: str = "") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        client.submit_yaml(text, resume_from=resume_from)
    return info.value


def test_alice_may_not_resume_from_bobs_job_an_admin_may(closed, clients, bobs_job):
    bobs_files = checkpoint_root(closed) / bobs_job
    before = digests(bobs_files)
    assert any(name.endswith("MANIFEST.json") for name in before)
    jobs = job_ids(clients)
    newest = clients["bob"].get(bobs_job).checkpoint  # .../<job>/<step>/MANIFEST.json
    for ref in (bobs_job, newest, newest.rsplit("/", 1)[0]):  # a job, a manifest, a directory
        err = refused(clients["alice"], spec_yaml(steps=80), resume_from=ref)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (ref, err.details())
        assert err.details().startswith(f"resume_from: job {bobs_job} belongs to bob, not to alice")
        assert "only a job's owner or an admin may resume from it" in err.details()
    assert job_ids(clients) == jobs  # no job was created
    assert digests(bobs_files) == before

    # An admin may: the job starts from bob's newest checkpoint and completes.
    job = clients["root"].submit_yaml(spec_yaml(steps=80), resume_from=bobs_job)
    status = clients["root"].wait(job, timeout=240)
    assert (status.state, status.restored_step) == ("COMPLETED", 60), status
    assert status.restored_from == newest
    assert digests(bobs_files) == before  # read, never written


def test_alice_may_not_point_storage_outside_the_allowed_roots(closed, clients, bobs_job, tmp_path):
    root = checkpoint_root(closed)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = root / "alice-link"
    link.symlink_to(outside, target_is_directory=True)  # inside the root, pointing out
    cases = [  # (field, spec fields, resume_from)
        ("checkpoint.url", {"checkpoint": {"url": str(outside / "ckpt")}}, ""),
        ("checkpoint.url", {"checkpoint": {"url": f"file://{root}/../escaped"}}, ""),
        ("checkpoint.url", {"checkpoint": {"url": str(link / "ckpt")}}, ""),
        ("checkpoint.url", {"checkpoint": {"url": f"file://{root}-evil"}}, ""),  # a sibling
        ("checkpoint.url", {"checkpoint": {"url": "memory://elasticd"}}, ""),
        ("checkpoint.url", {"checkpoint": {"url": "s3://bucket/checkpoints"}}, ""),
        ("tensorboard", {"tensorboard": str(outside / "tb")}, ""),
        ("resume_from", {}, f"file://{outside}/{bobs_job}/000000000020"),
    ]
    jobs = job_ids(clients)
    try:
        for field, fields, resume_from in cases:
            err = refused(clients["alice"], spec_yaml(steps=40, **fields), resume_from)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (fields, err.details())
            assert err.details().startswith(f"{field}: "), err.details()
            assert f"is not under an allowed storage root (allowed: {root})" in err.details()
        assert job_ids(clients) == jobs  # no job was created
        assert list(outside.iterdir()) == []  # nothing written through the link or beside it
        assert not (closed.base_dir / "escaped").exists()
        assert not Path(f"{root}-evil").exists()
    finally:
        link.unlink()


def test_urls_under_the_clusters_checkpoint_root_still_work(closed, clients):
    mine = checkpoint_root(closed) / "alice"
    fields = {"checkpoint": {"url": f"file://{mine}", "every_steps": 20}, "tensorboard": str(mine)}
    first = clients["alice"].submit_yaml(spec_yaml(steps=40, **fields))
    status = clients["alice"].wait(first, timeout=240)
    assert status.state == "COMPLETED" and status.checkpoint.startswith(f"file://{mine}/"), status
    assert (mine / first).is_dir()  # its TensorBoard events and its checkpoints
    # and alice resumes from her own checkpoint
    again = clients["alice"].submit_yaml(
        spec_yaml(steps=60, **fields), resume_from=status.checkpoint
    )
    resumed = clients["alice"].wait(again, timeout=240)
    assert (resumed.state, resumed.restored_step) == ("COMPLETED", 40), resumed
