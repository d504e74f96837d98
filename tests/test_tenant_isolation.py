"""A user who may submit does not own the cluster (issue 25), tried as an attacker would.

One closed cluster: per-kind certificates and settings, mutual TLS on every port,
etcd on TLS with a role per daemon kind, a tokens file with two users of role
``submit``, ``alice`` and ``bob``, and agents that run as root and start every
training process as ``nobody`` (``--run-as``). Bob trains a ps-async job with
checkpoints. Alice then:

- runs a script job (``tests/tasks/hostile_tenant.py``) that reads its
  environment, ``/proc/self/environ``, its agent's environment and the cluster's
  secret files; calls ``ExportShard``, ``Push`` and ``DropShard`` on the PS that
  hold bob's job and ``PublishRendezvous`` for it, with every credential it found;
  and writes etcd with whatever it has;
- resumes from bob's checkpoint;
- points ``checkpoint.url`` outside the allowed roots.

Each is refused, and bob's job completes with its loss and its checkpoints untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from elasticd.checkpoint.locate import load_state, locate
from elasticd.client import JobClient
from elasticd.coord.etcd import EtcdClient
from elasticd.local import LocalCluster
from elasticd.placement import ShardPlacement
from elasticd.retry import wait_until
from elasticd.security.local_pki import make_local_pki
from tests.jobs import spec_yaml

pytestmark = pytest.mark.slow

USERS = {"root": "admin", "alice": "submit", "bob": "submit"}
HOSTILE = Path(__file__).resolve().parent / "tasks" / "hostile_tenant.py"
BOB_STEPS = 400


@pytest.fixture(scope="module")
def world_dir():
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="elasticd-tenants-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tenants(world_dir, unprivileged, unprivileged_python):
    pki = make_local_pki(world_dir / "tls", users=USERS)
    c = LocalCluster(
        world_dir / "cluster",
        lease_ttl=3,
        join_window=0.5,
        threads_per_worker=1,
        pki=pki,
        agent_args=("--run-as", unprivileged.name),
        agent_python=unprivileged_python,
    )
    try:
        c.start(ps=2, agents=2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def clients(tenants):
    made = {
        u: JobClient(etcd=tenants.etcd, prefix=tenants.prefix, security=tenants.client_security(u))
        for u in USERS
    }
    yield made
    for client in made.values():
        client.close()


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def secrets_of(c: LocalCluster) -> dict[str, str]:
    """Every secret of the cluster that alice must not find, by where it comes from."""
    tls = c.pki.directory
    found = {
        "cluster token": (tls / "cluster-token").read_text().strip(),
        "bob's token": (tls / "token-bob").read_text().strip(),
        "root's token": (tls / "token-root").read_text().strip(),
    }
    for key in tls.glob("*-key.pem"):
        if key.name != "job-key.pem":  # the job handshake key grants nothing: it may be read
            body = "".join(key.read_text().splitlines()[1:-1])
            found[key.name] = body[16:80]  # a stretch of the key's base64
    for password in tls.glob("*password*"):
        found[password.name] = password.read_text().strip()
    return {k: v for k, v in found.items() if v}


def hostile_report(c: LocalCluster, job_id: str) -> dict:
    lines = []
    for log in (c.base_dir / "logs" / job_id).glob("*.log"):
        lines += [x for x in log.read_text().splitlines() if x.startswith("HOSTILE-REPORT ")]
    assert lines, f"no report in {list((c.base_dir / 'logs' / job_id).glob('*'))}"
    return json.loads(lines[-1].removeprefix("HOSTILE-REPORT "))


def test_a_submitter_owns_nothing_but_its_own_jobs(tenants, clients, world_dir):
    c = tenants
    bob, alice = clients["bob"], clients["alice"]
    bobs = bob.submit_yaml(
        spec_yaml(
            steps=BOB_STEPS,
            workers={"min": 1, "max": 1},
            checkpoint={"every_steps": 50},
            ps={"replicas": 2},
        )
    )
    wait_until(lambda: bob.get(bobs).checkpoint, 240, "bob's first checkpoint")
    status = bob.get(bobs)
    assert status.state == "RUNNING", status
    bobs_files = c.base_dir / "checkpoints" / bobs
    first_checkpoint = digests(bobs_files)

    # -- alice's hostile script job ---------------------------------------------------
    script = world_dir / "hostile_tenant.py"  # where the run-as user can read it
    shutil.copy(HOSTILE, script)
    script.chmod(0o644)
    placement = ShardPlacement.from_json(c.client.get(c.keys.placement(bobs)).value)
    ps_addresses = [
        json.loads(c.client.get(c.keys.ps(p)).value)["address"] for p in sorted(placement.ps_ids)
    ]
    tls = c.pki.directory
    target = {
        "job": bobs,
        "generation": status.generation,
        "ps": ps_addresses,
        "controller": c.leader(),
        "etcd": c.etcd,
        "prefix": c.prefix,
        "node": "node-0",
        "paths": [
            str(p)
            for p in (
                tls / "tokens.yaml",
                tls / "cluster-token",
                tls / "token-bob",
                tls / "controller.yaml",
                tls / "agent.yaml",
                tls / "agent-key.pem",
                tls / "controller-key.pem",
                tls / "ps-key.pem",
                c.base_dir / "logs" / "node-0.log",
                c.base_dir / "logs" / bobs / "node-0.0.log",
                c.base_dir / "logs" / bobs / "node-1.0.log",
                *sorted(bobs_files.rglob("*"))[:3],
            )
        ],
    }
    hostile = alice.submit_yaml(
        spec_yaml(
            mode="script",
            script={"path": str(script), "args": [json.dumps(target)]},
            workers={"min": 1, "max": 1},
        )
    )
    done = alice.wait(hostile, timeout=240)
    assert done.state == "COMPLETED", done
    report = hostile_report(c, hostile)
    text = json.dumps(report)

    assert report["uid"] != 0  # it ran as the unprivileged user, not as its root agent
    for name, secret in secrets_of(c).items():
        assert secret not in text, f"alice's job found {name}"
    for name in ("CLUSTER_TOKEN", "TOKENS_FILE", "ELASTICD_CONFIG", "ETCD_", "JOB_SECRET"):
        assert not any(name in k for k in report["env"]), (name, sorted(report["env"]))
        assert name not in report["proc_environ"], name
    for path, content in report["files"].items():
        assert content.startswith("error:"), f"alice's job read {path}"
    assert report["rpc"], "no call was tried"
    for call, codes in report["rpc"].items():
        assert set(codes) <= {"UNAUTHENTICATED", "PERMISSION_DENIED"}, (call, codes)
    assert set(report["rpc"]) >= {
        *(f"{rpc}@{a}" for rpc in ("ExportShard", "Push", "DropShard") for a in ps_addresses),
        "PublishRendezvous+1",
        "PublishRendezvous+1000",
    }
    assert len(report["etcd"]) == 3, report["etcd"]
    for how, outcome in report["etcd"].items():
        assert outcome != "written", how
    root_etcd = EtcdClient(c.etcd, security=c.pki.daemon("controller"))
    try:
        assert root_etcd.get_prefix(c.keys.assignments("node-0") + "hostile")[0] == []
    finally:
        root_etcd.close()

    # -- alice resumes from bob's checkpoint; points storage outside the roots ---------
    jobs = {j.job_id for j in clients["root"].list()}
    with pytest.raises(grpc.RpcError) as info:
        alice.submit_yaml(spec_yaml(steps=40), resume_from=bobs)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to bob" in info.value.details()
    outside = world_dir / "outside"
    with pytest.raises(grpc.RpcError) as info:
        alice.submit_yaml(spec_yaml(steps=40, checkpoint={"url": f"file://{outside}"}))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details().startswith("checkpoint.url: ")
    assert {j.job_id for j in clients["root"].list()} == jobs and not outside.exists()

    # -- bob's job: completed, its loss and checkpoints untouched ----------------------
    final = bob.wait(bobs, timeout=300)
    assert final.state == "COMPLETED", final
    assert final.step == BOB_STEPS and math.isfinite(final.loss), final
    assert final.generation == status.generation  # nothing alice did changed its membership
    after = digests(bobs_files)
    assert {k: after.get(k) for k in first_checkpoint} == first_checkpoint
    store, manifest = locate(final.checkpoint, str(c.base_dir / "checkpoints"))  # it verifies
    assert manifest.step == BOB_STEPS
    load_state(store, manifest)  # every shard reads back against its checksum
