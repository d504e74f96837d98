"""Owned storage, the pure part: whether a URL lies under an allowed root, and the policy.

Decision tables over :mod:`elasticd.security.storage`; no server. The real
cluster's refusals are in ``tests/test_owned_storage.py``.
"""

from __future__ import annotations

import os

import pytest

from elasticd.security.config import resolve
from elasticd.security.storage import (
    StoragePolicy,
    StorageRefused,
    StorageURL,
    is_under,
    storage_policy,
)
from elasticd.server.controller.admission import NotYours, check_resume_owner

UNDER = [  # (url, root, under?)
    ("s3://b/root/job", "s3://b/root", True),
    ("s3://b/root", "s3://b/root", True),
    ("s3://b/root/", "s3://b/root", True),
    ("s3a://b/root/job", "s3://b/root", True),  # one implementation, two names
    ("s3://b//root/./job", "s3://b/root", True),
    ("s3://b/root/a/../job", "s3://b/root", True),  # inside, resolved and read literally
    ("s3://b/root-evil", "s3://b/root", False),  # a sibling prefix
    ("s3://b/rootx/job", "s3://b/root", False),
    ("s3://b/root/../etc", "s3://b/root", False),
    ("s3://b/x/../root/job", "s3://b/root", False),  # under only once .. is resolved
    ("s3://other/root/job", "s3://b/root", False),  # another bucket
    ("s3://key:secret@b/root", "s3://b/root", False),
    ("gs://b/root/job", "s3://b/root", False),  # another protocol
    ("gcs://b/root/job", "gs://b/root", True),
    ("memory://b/root/job", "s3://b/root", False),
    ("memory://root/job", "memory://root", True),
    ("memory://root/../job", "memory://root", False),
    ("file:///srv/ckpt/job", "file:///srv/ckpt", True),
    ("/srv/ckpt/job", "file:///srv/ckpt", True),  # a plain path is a local URL
    ("local:///srv/ckpt/job", "/srv/ckpt", True),
    ("file:///srv/ckpt/../etc", "file:///srv/ckpt", False),
    ("/srv/ckpt/../../etc/passwd", "/srv/ckpt", False),
    ("file:///srv/ckpt-evil", "file:///srv/ckpt", False),
    ("file:///srv", "file:///srv/ckpt", False),  # a parent is not under its child
    ("s3://srv/ckpt/job", "file:///srv/ckpt", False),
    ("simplecache::file:///srv/ckpt/job", "file:///srv/ckpt", False),  # brings its own cache
    ("", "file:///srv/ckpt", False),
    ("s3://b/anything", "s3://b", True),  # a whole bucket as root
]


@pytest.mark.parametrize(("url", "root", "under"), UNDER)
def test_a_url_is_under_a_root_by_its_parsed_parts(url, root, under):
    assert is_under(url, root) is under


def test_local_paths_are_taken_as_fsspec_takes_them_and_resolved_by_the_os(tmp_path):
    root = tmp_path / "root"
    (root / "jobs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)  # a link out of the root
    (tmp_path / "alias").symlink_to(root)  # a link to the root
    assert is_under(f"file://{root}/jobs/x", str(root))
    assert not is_under(f"file://{root}/escape/x", str(root))
    assert not is_under(f"{root}/escape", f"file://{root}")
    assert is_under(f"{tmp_path}/alias/jobs", str(root))  # where it lands is what counts
    assert is_under(f"{root}/jobs", f"file://{tmp_path}/alias")
    # file://etc is not /etc to fsspec: it is etc under the working directory
    assert StorageURL.parse("file://etc").parts == StorageURL.local_path("etc").parts
    assert is_under("file://relative/x", os.getcwd())


def test_an_open_policy_allows_anything_and_a_closed_one_names_the_field():
    assert StoragePolicy.open().refusal("checkpoint.url", "s3://anyone/anything") is None
    policy = StoragePolicy(("file:///srv/ckpt", "s3://b/root"))
    assert policy.refusal("checkpoint.url", "s3://b/root/mine") is None
    assert policy.refusal("checkpoint.url", "") is None  # the controller's own root
    with pytest.raises(StorageRefused) as info:
        policy.check("checkpoint.url", "s3://b/root-evil")
    assert str(info.value) == (
        "checkpoint.url: 's3://b/root-evil' is not under an allowed storage root "
        "(allowed: file:///srv/ckpt, s3://b/root)"
    )
    problem = policy.refusal("resume_from", "simplecache::s3://b/root/x")
    assert problem.startswith("resume_from: ") and "chained URL" in problem
    # tensorboard is a local directory the controller opens, whatever it looks like
    assert policy.refusal("tensorboard", "/srv/ckpt/tb", local=True) is None
    assert "tensorboard: 's3://b/root/tb'" in policy.refusal("tensorboard", "s3://b/root/tb", True)
    assert StoragePolicy(("not a url::",)).refusal("checkpoint.url", "/x") is not None
    assert "embedded null byte" in policy.refusal("checkpoint.url", "/srv/ckpt/\x00")
    assert len(policy.refusal("checkpoint.url", "s3://x/" + "a" * 10**6)) < 400  # shown cut


POLICIES = [  # (allowed_storage, tokens file?, roots; None: anything)
    ((), False, None),  # an open cluster, as before
    ((), True, ("/var/ckpt",)),  # a closed one: its own checkpoint root only
    (("s3://b/root",), False, ("s3://b/root", "/var/ckpt")),  # listed: enforced
    (("s3://b/root", "/var/ckpt"), True, ("s3://b/root", "/var/ckpt")),
]


@pytest.mark.parametrize(("allowed", "tokens", "roots"), POLICIES)
def test_the_controllers_policy(allowed, tokens, roots):
    assert storage_policy(allowed, tokens, "/var/ckpt").roots == roots


def test_allowed_storage_comes_from_the_settings_file_or_the_environment(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("allowed_storage: [file:///srv/ckpt, s3://b/root]\n")
    assert resolve(None, {"ELASTICD_CONFIG": str(config)}).allowed_storage == (
        "file:///srv/ckpt",
        "s3://b/root",
    )
    environ = {"ELASTICD_ALLOWED_STORAGE": "memory://a, s3://b/root"}
    assert resolve(None, environ).allowed_storage == ("memory://a", "s3://b/root")


OWNERS = {"bob-000001": "bob", "alice-000002": "alice", "old-000003": ""}
RESUMES = [  # (resume_from, caller, admin, allowed?)
    ("alice-000002", "alice", False, True),
    ("bob-000001", "alice", False, False),
    ("bob-000001", "root", True, True),  # an admin may resume from anyone's job
    ("file:///c/bob-000001/000000000040", "alice", False, False),
    ("s3://b/c/bob-000001/000000000040/MANIFEST.json", "alice", False, False),
    ("file:///c/alice-000002/000000000040/", "alice", False, True),
    ("gone-000004", "alice", False, False),  # no record: nobody can say it is hers
    ("gone-000004", "root", True, True),
    ("old-000003", "alice", False, False),  # recorded before owners were
    ("file:///not/a/checkpoint", "alice", False, True),  # names no job: locate refuses it
]


def test_a_refused_resume_names_a_long_job_id_in_short():
    with pytest.raises(NotYours) as info:
        check_resume_owner("j" * 10**6, "alice", False, OWNERS.get)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(("ref", "caller", "admin", "allowed"), RESUMES)
def test_only_a_jobs_owner_or_an_admin_resumes_from_it(ref, caller, admin, allowed):
    def check():
        check_resume_owner(ref, caller, admin, OWNERS.get)

    if allowed:
        check()
    else:
        with pytest.raises(NotYours, match=r"^resume_from: job .*only .*admin"):
            check()
