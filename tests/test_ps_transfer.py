"""A shard's whole state out of and back into the PS tier (mode switches), over real gRPC."""

from __future__ import annotations

import grpc
import pytest
import torch

from elasticd.placement import TensorSpec, place
from elasticd.rpc import ps_pb2
from elasticd.slicing import join_slices, split_state
from elasticd.wire import dtype_name
from tests.fixtures.ps import PSCluster

OPT = ("adam", {"lr": 0.01})


def trained_tier(ps_cluster: PSCluster):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 40), torch.nn.Linear(40, 3))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    specs = [TensorSpec(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in params.items()]
    placement = place(specs, ["ps-0", "ps-1"], min_split_bytes=0)
    servers = ps_cluster.start(2)
    tier = ps_cluster.tier(servers, placement)
    tier.init(params, *OPT, max_staleness=-1, workers=1, max_version=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        versions = tier.pull_into(params)
        grads = {n: torch.randn(t.shape, generator=g) for n, t in params.items()}
        tier.push(grads, versions)
    return servers, placement, tier


def test_export_then_import_at_a_newer_generation_is_bitwise_identical(ps_cluster):
    servers, placement, tier = trained_tier(ps_cluster)
    params, named = join_slices(placement, tier.export_state())
    assert named  # Adam's moments came along
    newer = ps_cluster.tier(servers, placement, generation=2)
    newer.import_state(
        split_state(placement, params, named),
        *OPT,
        max_staleness=-1,
        workers=1,
        max_version=0,
        version=7,
    )
    assert {i.version for i in newer.info().values()} == {7}
    again_params, again_named = join_slices(placement, newer.export_state())
    for n, t in params.items():
        assert torch.equal(again_params[n], t)
        for k, v in named[n].items():
            assert (
                torch.equal(again_named[n][k], v)
                if isinstance(v, torch.Tensor)
                else again_named[n][k] == v
            )
    # The old generation is fenced off by the import.
    with pytest.raises(Exception, match="stale"):
        tier.export_state()


def test_malformed_import_is_refused_and_changes_nothing(ps_cluster):
    servers, placement, tier = trained_tier(ps_cluster)
    before = tier.export_state()
    params, named = join_slices(placement, before)
    parts = split_state(placement, params, named)
    ps_id = placement.ps_ids[0]
    tensors, state, keys = parts[ps_id]
    first = next(iter(state))
    bad_state = {**state, first: {**state[first], "exp_avg": torch.zeros(1, 1, 1)}}
    bad = {**parts, ps_id: (tensors, bad_state, keys)}
    newer = ps_cluster.tier(servers, placement, generation=2)
    with pytest.raises(grpc.RpcError) as info:
        newer.import_state(bad, *OPT, max_staleness=-1, workers=1, max_version=0, version=9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exp_avg" in info.value.details()
    stub = ps_cluster.stub(servers[0])
    with pytest.raises(grpc.RpcError) as info:
        list(
            stub.ImportShard(iter([ps_pb2.ImportShardRequest(bytes=ps_pb2.ShardBytes(data=b"x"))]))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The refused shard is unchanged and its server still serves. (Each PS imports
    # its own part: the other took its good one; a switch simply imports again.)
    after = newer.export_state()
    for k, t in before[ps_id][0].items():
        assert torch.equal(after[ps_id][0][k], t)
    assert after[ps_id][2]["version"] == before[ps_id][2]["version"]
