"""`elasticd checkpoint ls|verify|export` on checkpoints written by real parameter servers."""

from __future__ import annotations

import json

import pytest
import torch

from elasticd.checkpoint import CheckpointStore
from elasticd.cli import main as cli
from elasticd.server.controller.checkpoints import checkpoint_ps_job
from elasticd.slicing import join_slices
from tests.fixtures.ps import JOB
from tests.test_ps_service import bitwise_equal, mlp, ps_step
from tests.test_restore_tier import addresses, flip_byte, snapshot, trained

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


@pytest.fixture
def two_checkpoints(ps_cluster, tmp_path):
    """Checkpoints of JOB at steps 3 and 6 under tmp_path/ckpt: (root, older, newer, held)."""
    servers, placement, model = trained(ps_cluster, 3)
    root = tmp_path / "ckpt"
    older, _ = checkpoint_ps_job(snapshot(1), placement, addresses(servers), str(root))
    tier = ps_cluster.tier(servers, placement)
    for i in range(3, 6):
        ps_step(model, tier, i)
    newer, _ = checkpoint_ps_job(snapshot(1, older.step), placement, addresses(servers), str(root))
    held, _ = join_slices(placement, tier.export_state())
    return root, older, newer, held


def ls(url: str, capsys) -> list[dict]:
    assert cli(["checkpoint", "ls", url, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ls_shows_each_checkpoint_and_whether_it_verifies(two_checkpoints, capsys):
    root, older, newer, _ = two_checkpoints
    for url in (str(root), str(root / JOB)):
        found = ls(url, capsys)
        assert [(r["job_id"], r["step"], r["mode"], r["verified"]) for r in found] == [
            (JOB, 3, "ps-async", True),
            (JOB, 6, "ps-async", True),
        ]
        assert all(r["bytes"] == sum(s.size for s in newer.shards) for r in found)

    flip_byte(root / JOB / f"{newer.step:012d}" / newer.shards[0].path)
    assert [r["verified"] for r in ls(str(root), capsys)] == [True, False]
    assert cli(["checkpoint", "ls", str(root)]) == 0
    assert "NO (corrupt or incomplete)" in capsys.readouterr().out


def test_verify_names_a_corrupt_checkpoint(two_checkpoints, capsys):
    root, older, newer, _ = two_checkpoints
    newest = root / JOB / f"{newer.step:012d}"
    assert cli(["checkpoint", "verify", str(newest)]) == 0
    flip_byte(newest / newer.shards[0].path)
    assert cli(["checkpoint", "verify", str(newest / "MANIFEST.json")]) == 1
    assert "is corrupt" in capsys.readouterr().err
    # A job's directory names its newest checkpoint that verifies.
    assert cli(["checkpoint", "verify", str(root / JOB)]) == 0
    assert f"step {older.step}" in capsys.readouterr().out


def test_export_loads_with_weights_only_into_the_model(two_checkpoints, tmp_path):
    root, _, newer, held = two_checkpoints
    out = tmp_path / "model.pt"
    assert (
        cli(["checkpoint", "export", str(root / JOB / f"{newer.step:012d}"), "--out", str(out)])
        == 0
    )
    state = torch.load(out, weights_only=True)
    model = mlp(seed=123)  # another initialisation: every value must come from the checkpoint
    model.load_state_dict(state, strict=True)
    for name, p in model.named_parameters():
        assert bitwise_equal(p.detach(), held[name]), name


def test_export_of_nothing_is_an_error(tmp_path, capsys):
    code = cli(["checkpoint", "export", str(tmp_path / "none" / JOB), "--out", str(tmp_path / "x")])
    assert code == 1
    assert "no verified checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert CheckpointStore(str(tmp_path / "none")).list_manifests(JOB) == []
