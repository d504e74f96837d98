"""The parameter server over real gRPC on loopback, driven through PSTier and the raw stub.

Pins: the PS applies exactly torch.optim's update (so state can move between a
PS shard and a worker replica), bounded staleness, generation fencing
(invariant 3), bad input rejected with a status and no change (invariant 8),
and snapshots that load back without pickle (invariant 7).
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from elasticd.checkpoint import decode_shard
from elasticd.optimizers import build_optimizer
from elasticd.placement import ShardPlacement, TensorSpec, place
from elasticd.ps_client import PSTier, slice_view
from elasticd.ps_control import advance_fence, drop_shards, shard_infos
from elasticd.ps_errors import Fenced, StaleGradient
from elasticd.rpc import ps_pb2
from elasticd.server.ps import transfer
from elasticd.wire import as_bytes, dtype_name
from tests.fixtures.ps import JOB, PS, PSCluster

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

STEPS = 10


# -- a small deterministic model -------------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(7, 33), nn.Tanh(), nn.Linear(33, 3))


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + index)
    return torch.randn(16, 7, generator=g), torch.randn(16, 3, generator=g)


def loss_of(model: nn.Module, index: int) -> torch.Tensor:
    x, y = batch(index)
    return nn.functional.mse_loss(model(x), y)


def specs(model: nn.Module) -> list[TensorSpec]:
    return [TensorSpec(n, dtype_name(p.dtype), tuple(p.shape)) for n, p in model.named_parameters()]


def placement_for(model: nn.Module, servers: list[PS]) -> ShardPlacement:
    # A small split threshold: the first layer's weight is cut by rows across two servers.
    return place(specs(model), [s.ps_id for s in servers], min_split_bytes=256)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


def ps_step(model: nn.Module, tier: PSTier, index: int) -> dict:
    """One worker step through the PS: pull, forward/backward, push."""
    versions = tier.pull_into(weights(model))
    model.zero_grad(set_to_none=True)
    loss_of(model, index).backward()
    return tier.push(grads(model), versions)


def pulled(tier: PSTier, like: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: torch.full_like(p, float("nan")) for n, p in like.named_parameters()}
    with torch.no_grad():
        tier.pull_into(out)
    return out


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bytes(as_bytes(a)) == bytes(as_bytes(b))


# -- torch.optim equivalence -----------------------------------------------------------

OPTIMIZER_CASES = [
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}),
    ("adam", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.05}),
    ("adagrad", {"lr": 0.1}),
]


@pytest.mark.parametrize(("name", "kwargs"), OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_ps_training_equals_local_torch_optim(
    ps_cluster: PSCluster, name: str, kwargs: dict, rpc_path: str
) -> None:
    servers = ps_cluster.start(2)
    worker = mlp()
    placement = placement_for(worker, servers)
    assert any(not s.whole for s in placement.slices), "no tensor was split by rows"
    assert len(placement.ps_ids) == 2
    tier = ps_cluster.tier(servers, placement)
    created = tier.init(weights(worker), name, kwargs, max_staleness=-1, workers=1, max_version=0)
    assert created == {"ps-0": True, "ps-1": True}

    local = mlp()
    opt = build_optimizer(name, kwargs, local.parameters())
    initial = {n: p.detach().clone() for n, p in local.named_parameters()}

    for i in range(STEPS):
        outcomes = ps_step(worker, tier, i)
        assert {o.version for o in outcomes.values()} == {i + 1}
        assert all(o.applied and o.staleness == 0 for o in outcomes.values())
        opt.zero_grad(set_to_none=True)
        loss_of(local, i).backward()
        opt.step()

    remote = pulled(tier, local)
    for n, p in local.named_parameters():
        assert not torch.equal(p.detach(), initial[n]), f"{n} never trained"
        # Bitwise: the PS runs the same per-tensor torch.optim arithmetic on row slices.
        assert bitwise_equal(remote[n], p.detach()), (
            f"{name}: {n} differs by {(remote[n] - p.detach()).abs().max().item()}"
        )

    # The optimizer state on the shards is the local state, row slice by row slice.
    local_params = dict(local.named_parameters())
    for ps in servers:
        shard = ps.servicer.shard(JOB)
        assert shard.version == STEPS
        for s, shard_param in zip(placement.in_group(ps.ps_id), shard.params, strict=True):
            full = local_params[s.param]
            mine, theirs = opt.state[full], shard.optimizer.state[shard_param]
            assert set(mine) == set(theirs) and mine, f"{name}: state keys of {s.key}"
            for key, value in mine.items():
                expected = value
                if value.dim() and value.shape == full.shape:
                    expected = slice_view(value, s)
                assert bitwise_equal(theirs[key], expected), f"{name}: state {key} of {s.key}"


# -- staleness -------------------------------------------------------------------------


def shard_state(ps: PS, job: str = JOB) -> tuple[int, list[torch.Tensor], dict]:
    shard = ps.servicer.shard(job)
    state = {
        (i, k): v.clone()
        for i, s in shard.optimizer.state_dict()["state"].items()
        for k, v in s.items()
    }
    return shard.version, [p.detach().clone() for p in shard.params], state


def assert_same_state(before: tuple, after: tuple) -> None:
    assert after[0] == before[0], f"version moved from {before[0]} to {after[0]}"
    assert len(after[1]) == len(before[1])
    for a, b in zip(before[1], after[1], strict=True):
        assert bitwise_equal(a, b)
    assert set(after[2]) == set(before[2])
    for k in before[2]:
        assert bitwise_equal(before[2][k], after[2][k]), f"optimizer state {k} changed"


def test_push_beyond_max_staleness_is_rejected(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    worker = mlp()
    tier = ps_cluster.tier([ps], placement_for(worker, [ps]))
    tier.init(weights(worker), "sgd", {"lr": 0.1, "momentum": 0.9}, 1, 1, 0)

    base = tier.pull_into(weights(worker))  # version 0
    worker.zero_grad(set_to_none=True)
    loss_of(worker, 0).backward()
    old_grads = {n: g.clone() for n, g in grads(worker).items()}
    ps_step(worker, tier, 1)  # version 1
    ps_step(worker, tier, 2)  # version 2
    before = shard_state(ps)
    assert before[0] == 2

    with pytest.raises(StaleGradient, match="2 versions old; the job allows 1"):
        tier.push(old_grads, base)
    assert_same_state(before, shard_state(ps))
    assert tier.info()[ps.ps_id].version == 2
    assert ps.servicer.shard(JOB).pushes_rejected == 1

    # Exactly at the bound is accepted.
    outcome = tier.push(old_grads, {ps.ps_id: 1})[ps.ps_id]
    assert (outcome.version, outcome.applied, outcome.staleness) == (3, True, 1)


def test_unbounded_staleness_accepts_old_gradients(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    worker = mlp()
    tier = ps_cluster.tier([ps], placement_for(worker, [ps]))
    tier.init(weights(worker), "sgd", {"lr": 0.1}, -1, 1, 0)
    base = tier.pull_into(weights(worker))
    for i in range(3):
        ps_step(worker, tier, i)
    worker.zero_grad(set_to_none=True)
    loss_of(worker, 9).backward()
    outcome = tier.push(grads(worker), base)[ps.ps_id]
    assert (outcome.version, outcome.applied, outcome.staleness) == (4, True, 3)


def test_pushes_stop_at_max_version(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    worker = mlp()
    tier = ps_cluster.tier([ps], placement_for(worker, [ps]))
    tier.init(weights(worker), "sgd", {"lr": 0.1}, -1, 1, 2)
    ps_step(worker, tier, 0)
    ps_step(worker, tier, 1)
    before = shard_state(ps)
    outcome = ps_step(worker, tier, 2)[ps.ps_id]
    assert (outcome.version, outcome.applied) == (2, False)
    assert_same_state(before, shard_state(ps))


# -- fencing -----------------------------------------------------------------------------


def test_old_generation_is_fenced_after_advance(ps_cluster: PSCluster, tmp_path: Path) -> None:
    servers = ps_cluster.start(2)
    worker = mlp()
    placement = placement_for(worker, servers)
    gen1 = ps_cluster.tier(servers, placement, generation=1)
    gen1.init(weights(worker), "adam", {"lr": 0.01}, -1, 1, 0)
    ps_step(worker, gen1, 0)

    gen2 = ps_cluster.tier(servers, placement, generation=2)
    addresses = {ps.ps_id: ps.address for ps in servers}
    assert advance_fence(JOB, 2, 2, addresses) == {}
    assert {i.generation for i in shard_infos(JOB, addresses).values()} == {2}
    before = [shard_state(ps) for ps in servers]

    worker.zero_grad(set_to_none=True)
    loss_of(worker, 1).backward()
    with pytest.raises(Fenced, match="generation 1 is stale, the job is at generation 2"):
        gen1.push(grads(worker), {p: 1 for p in gen1.ps_ids})
    with pytest.raises(Fenced):
        gen1.pull_into(weights(worker))
    with pytest.raises(Fenced):
        gen1.snapshot(str(tmp_path), 1)
    for ps in servers:
        with pytest.raises(grpc.RpcError) as err:
            ps_cluster.stub(ps).AdvanceGeneration(
                ps_pb2.AdvanceGenerationRequest(fence=ps_pb2.Fence(job_id=JOB, generation=1))
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    refused = drop_shards(JOB, 1, addresses)
    assert sorted(refused) == sorted(addresses)
    assert all(r.startswith("FAILED_PRECONDITION") for r in refused.values())
    for ps, b in zip(servers, before, strict=True):
        assert_same_state(b, shard_state(ps))
        assert ps.servicer.shard(JOB).generation == 2
    assert not list(tmp_path.iterdir()), "a fenced snapshot wrote something"

    # The new generation trains on.
    outcomes = ps_step(worker, gen2, 1)
    assert {o.version for o in outcomes.values()} == {2}


def test_newer_generation_push_advances_the_fence(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    worker = mlp()
    placement = placement_for(worker, [ps])
    gen1 = ps_cluster.tier([ps], placement, generation=1)
    gen1.init(weights(worker), "sgd", {"lr": 0.1}, -1, 1, 0)
    gen3 = ps_cluster.tier([ps], placement, generation=3)
    ps_step(worker, gen3, 0)
    assert ps.servicer.shard(JOB).generation == 3
    with pytest.raises(Fenced):
        gen1.pull_into(weights(worker))


# -- a tiny two-tensor shard, shared with the other PS test modules --------------

W_BYTES = 3 * 4 * 4  # "w": float32 (3, 4)
B_BYTES = 4 * 4  # "b": float32 (4,)


def tiny_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def tiny_placement(ps: PS) -> ShardPlacement:
    return place([TensorSpec("w", "float32", (3, 4)), TensorSpec("b", "float32", (4,))], [ps.ps_id])


# -- snapshot ---------------------------------------------------------------------------------


def test_snapshot_writes_loadable_shards(ps_cluster: PSCluster, tmp_path: Path) -> None:
    servers = ps_cluster.start(2)
    worker = mlp()
    placement = placement_for(worker, servers)
    kwargs = {"lr": 0.01, "betas": [0.8, 0.95]}
    tier = ps_cluster.tier(servers, placement)
    tier.init(weights(worker), "adam", kwargs, -1, 1, 0)
    for i in range(3):
        ps_step(worker, tier, i)
    current = pulled(tier, worker)

    replies = tier.snapshot(str(tmp_path), 3)
    assert set(replies) == {"ps-0", "ps-1"}

    # One more step on the PS tier, to check a loaded optimizer continues identically.
    worker.zero_grad(set_to_none=True)
    loss_of(worker, 3).backward()
    next_grads = {n: g.clone() for n, g in grads(worker).items()}
    tier.push(next_grads, dict.fromkeys(tier.ps_ids, 3))
    after = pulled(tier, worker)

    step_dir = tmp_path / JOB / f"{3:012d}"
    assert sorted(p.name for p in step_dir.iterdir()) == sorted(r.path for r in replies.values())
    for ps_id, reply in replies.items():
        data = (step_dir / reply.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (reply.size, reply.sha256)
        assert reply.version == 3
        tensors, opt_state, meta = decode_shard(data)
        slices = placement.in_group(ps_id)
        assert meta["keys"] == [s.key for s in slices]
        assert (meta["version"], meta["job_id"], meta["optimizer"]) == (3, JOB, "adam")
        assert set(tensors) == {s.key for s in slices}
        for s in slices:
            assert bitwise_equal(tensors[s.key], slice_view(current[s.param], s))

        params = [nn.Parameter(tensors[k].clone()) for k in meta["keys"]]
        opt = build_optimizer("adam", kwargs, params)
        opt.load_state_dict(opt_state)
        assert opt.param_groups[0]["betas"] == (0.8, 0.95)
        assert len(opt.state) == len(params)
        for p, s in zip(params, slices, strict=True):
            p.grad = slice_view(next_grads[s.param], s).clone()
        opt.step()
        for p, s in zip(params, slices, strict=True):
            assert bitwise_equal(p.detach(), slice_view(after[s.param], s)), s.key


def test_snapshot_reads_no_pickle(ps_cluster: PSCluster, tmp_path: Path) -> None:
    (ps,) = ps_cluster.start(1)
    tier = ps_cluster.tier([ps], tiny_placement(ps))
    tier.init(tiny_tensors(), "sgd", {"lr": 0.1}, -1, 1, 0)
    (reply,) = tier.snapshot(str(tmp_path), 0).values()
    data = (tmp_path / JOB / f"{0:012d}" / reply.path).read_bytes()
    # A safetensors document: an 8-byte header length, then a JSON header.
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    assert "t/w" in header and "t/b" in header
    tensors, _, _ = decode_shard(data)
    for k, v in tiny_tensors().items():
        assert bitwise_equal(tensors[k], v)


def test_pushes_wait_only_for_a_snapshots_copy_not_its_encoding(
    ps_cluster: PSCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ps,) = ps_cluster.start(1)
    tier = ps_cluster.tier([ps], tiny_placement(ps))
    tier.init(tiny_tensors(), "adam", {"lr": 0.1}, -1, 1, 0)
    ones = {k: torch.ones_like(v) for k, v in tiny_tensors().items()}
    tier.push(ones, {ps.ps_id: 0})
    before = tier.pull_into(dict(tiny_tensors()))
    held = {k: v.clone() for k, v in tiny_tensors().items()}
    tier.pull_into(held)

    encoding, release = threading.Event(), threading.Event()
    real_encode = transfer.encode_shard

    def held_encode(*args, **kwargs):
        encoding.set()
        assert release.wait(30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(transfer, "encode_shard", held_encode)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(tier.snapshot, str(tmp_path), 1)
        assert encoding.wait(30)
        # The snapshot is still encoding: a push is applied meanwhile.
        (outcome,) = tier.push(ones, before).values()
        assert outcome.applied and outcome.version == 2
        release.set()
        (reply,) = pending.result(timeout=30).values()
    # ...and the snapshot holds the state as it was copied, before that push.
    assert reply.version == 1
    tensors, _, meta = decode_shard((tmp_path / JOB / f"{1:012d}" / reply.path).read_bytes())
    assert meta["version"] == 1
    for key, value in held.items():
        assert bitwise_equal(tensors[key], value)
