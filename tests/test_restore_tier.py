"""Restoring a PS tier from a checkpoint onto another placement, bit for bit.

Real parameter servers on loopback and a real checkpoint store. A job trained
on two servers is checkpointed, then restored onto other placements (one
server; three servers with a parameter cut by rows), as the controller does
when a PS is lost. Parameters, torch.optim state and version must come back
exactly as the checkpoint holds them, and a corrupt checkpoint must never be
the one restored.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elasticd.checkpoint import CheckpointStore, CorruptShard
from elasticd.checkpoint.locate import NoSuchCheckpoint, load_state
from elasticd.jobspec import parse_spec
from elasticd.membership import assign_ranks
from elasticd.placement import place
from elasticd.security.storage import StoragePolicy, StorageRefused
from elasticd.server.controller import restore
from elasticd.server.controller.checkpoints import checkpoint_ps_job
from elasticd.server.controller.planning import JobSnapshot
from elasticd.server.controller.records import RUNNING, JobRecord
from elasticd.server.controller.restore import direct_sources, restore_source, restore_tier
from elasticd.slicing import join_slices
from tests.fixtures.ps import JOB, PSCluster
from tests.test_ps_service import bitwise_equal, mlp, placement_for, ps_step, specs, weights

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

OPTIMIZER = {"name": "adam", "lr": 0.01}
SPEC = parse_spec(
    {
        "name": "j",
        "mode": "ps-async",
        "task": "linreg.py",
        "steps": 1000,
        "optimizer": OPTIMIZER,
    }
)


def snapshot(generation: int, checkpoint_step: int = 0) -> JobSnapshot:
    record = JobRecord(
        JOB, "j", "ps-async", state=RUNNING, generation=generation, checkpoint_step=checkpoint_step
    )
    return JobSnapshot(SPEC, record, assign_ranks(JOB, generation, ["n.0"]))


def trained(ps_cluster: PSCluster, steps: int):
    """A job trained ``steps`` steps on two servers: (servers, placement, model)."""
    servers = ps_cluster.start(2)
    model = mlp()
    placement = placement_for(model, servers)
    tier = ps_cluster.tier(servers, placement)
    tier.init(weights(model), "adam", {"lr": 0.01}, -1, 1, 10_000)
    for i in range(steps):
        ps_step(model, tier, i)
    return servers, placement, model


def addresses(servers) -> dict[str, str]:
    return {s.ps_id: s.address for s in servers}


def checkpoint_state(store: CheckpointStore, manifest) -> tuple[dict, dict]:
    return load_state(store, manifest)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_bitwise(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (pa, sa), (pb, sb) = a, b
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert bitwise_equal(pa[name], pb[name]), name
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sorted(sa[name]) == sorted(sb[name])
        for key, value in sa[name].items():
            other = sb[name][key]
            if isinstance(value, torch.Tensor):
                assert bitwise_equal(value, other), (name, key)
            else:
                assert value == other, (name, key)


@pytest.mark.parametrize("targets", [1, 3], ids=["onto-one-ps", "onto-three-ps-cut-by-rows"])
def test_a_checkpoint_restores_onto_another_placement_bit_for_bit(ps_cluster, tmp_path, targets):
    servers, placement, model = trained(ps_cluster, 7)
    url = str(tmp_path / "ckpt")
    manifest, _ = checkpoint_ps_job(snapshot(1), placement, addresses(servers), url)
    assert manifest is not None and manifest.step == 7

    fresh = ps_cluster.start(targets)
    target = place(specs(model), [s.ps_id for s in fresh], min_split_bytes=64)
    if targets > 1:
        assert any(not s.whole for s in target.slices)
    store = CheckpointStore(url)
    restored = restore_tier(SPEC, JOB, 2, 1, target, addresses(fresh), store, store.latest(JOB))
    assert restored.manifest.step == 7

    tier = ps_cluster.tier(fresh, target, generation=2)
    assert {i.version for i in tier.info().values()} == {7}
    assert {i.generation for i in tier.info().values()} == {2}
    held = join_slices(target, tier.export_state())
    assert_bitwise(held, checkpoint_state(CheckpointStore(url), manifest))


def test_a_corrupt_newest_checkpoint_is_never_restored(ps_cluster, tmp_path):
    servers, placement, model = trained(ps_cluster, 3)
    url = str(tmp_path / "ckpt")
    older, _ = checkpoint_ps_job(snapshot(1), placement, addresses(servers), url)
    tier = ps_cluster.tier(servers, placement)
    for i in range(3, 6):
        ps_step(model, tier, i)
    newer, _ = checkpoint_ps_job(snapshot(1, older.step), placement, addresses(servers), url)
    assert (older.step, newer.step) == (3, 6)
    store = CheckpointStore(url)
    flip_byte(tmp_path / "ckpt" / JOB / f"{newer.step:012d}" / newer.shards[0].path)

    (fresh,) = ps_cluster.start(1)
    target = place(specs(model), [fresh.ps_id])
    chosen = restore_source(snapshot(2), url)[1]  # the job's newest checkpoint that verifies
    restored = restore_tier(SPEC, JOB, 2, 1, target, addresses([fresh]), store, chosen)
    assert restored.manifest.step == older.step
    held = join_slices(target, ps_cluster.tier([fresh], target, generation=2).export_state())
    assert_bitwise(held, checkpoint_state(store, older))


def test_nothing_to_restore_without_a_checkpoint(tmp_path):
    with pytest.raises(NoSuchCheckpoint, match="no verified checkpoint"):
        restore_source(snapshot(2), str(tmp_path / "none"))


def test_a_restore_reads_no_storage_the_allowed_roots_no_longer_hold(tmp_path):
    allowed = StoragePolicy((str(tmp_path / "allowed"),))
    snap = snapshot(2)
    elsewhere = f"file://{tmp_path}/elsewhere/{JOB}/000000000007/MANIFEST.json"
    resumed = replace(snap, record=replace(snap.record, resume_from=elsewhere))
    with pytest.raises(StorageRefused, match=r"^resume_from: .* is not under an allowed"):
        restore_source(resumed, str(tmp_path / "allowed"), allowed)
    spec = replace(SPEC, checkpoint=replace(SPEC.checkpoint, url=str(tmp_path / "elsewhere")))
    with pytest.raises(StorageRefused, match=r"^checkpoint.url: .* is not under an allowed"):
        restore_source(replace(snap, spec=spec), str(tmp_path / "allowed"), allowed)
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(NoSuchCheckpoint, match="no verified checkpoint"):  # its own root: read
        restore_source(snap, str(tmp_path / "allowed"), allowed)


def test_each_ps_reads_its_own_shard_when_the_checkpoint_is_cut_for_its_placement(
    ps_cluster, tmp_path, monkeypatch
):
    servers, placement, model = trained(ps_cluster, 5)
    url = str(tmp_path / "ckpt")
    manifest, _ = checkpoint_ps_job(snapshot(1), placement, addresses(servers), url)
    tier = ps_cluster.tier(servers, placement)
    for i in range(5, 8):
        ps_step(model, tier, i)  # the servers move on from the checkpoint
    assert direct_sources(placement, manifest) is not None
    assert direct_sources(place(specs(model), ["other"]), manifest) is None

    def controller_read(*_args):
        raise AssertionError("the controller read the checkpoint itself")

    store = CheckpointStore(url)
    with monkeypatch.context() as m:
        m.setattr(restore, "load_state", controller_read)
        restore_tier(SPEC, JOB, 2, 1, placement, addresses(servers), store, manifest)
    held = join_slices(placement, ps_cluster.tier(servers, placement, generation=2).export_state())
    assert_bitwise(held, checkpoint_state(store, manifest))
    assert {i.version for i in ps_cluster.tier(servers, placement, 2).info().values()} == {5}

    # A flipped byte: the PS refuses the shard (DATA_LOSS), and so does the controller's read.
    flip_byte(tmp_path / "ckpt" / JOB / f"{manifest.step:012d}" / manifest.shards[0].path)
    fenced = ps_cluster.tier(servers, placement, generation=3)
    with pytest.raises(CorruptShard, match="sha256"):
        fenced.restore_from(
            direct_sources(placement, manifest),
            url,
            "adam",
            {"lr": 0.01},
            -1,
            workers=1,
            max_version=10_000,
            version=manifest.step,
            checkpoint=(JOB, manifest.step),
        )
    with pytest.raises(CorruptShard):
        restore_tier(SPEC, JOB, 3, 1, placement, addresses(servers), store, manifest)
