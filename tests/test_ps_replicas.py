"""Hot replicas on real PS servers: every update applied on both copies, in order.

A primary forwards each update to its backup before it steps, so after any
sequence of pushes (asynchronous, synchronous, compressed) the two copies of a
group hold the same parameters and optimizer state bit for bit. A push sent
again under the same push id is applied once. A backup that does not answer
fails the push on both copies, and a worker cannot push to a backup.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from elasticd.jobspec import parse_spec
from elasticd.membership import assign_ranks
from elasticd.placement import ShardPlacement, place
from elasticd.ps_client import PSTier
from elasticd.ps_errors import Fenced, PSUnavailable
from elasticd.rpc import ps_pb2
from elasticd.server.controller.failover import fail_over
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot
from elasticd.server.controller.records import RUNNING, JobRecord
from tests.fixtures.ps import JOB, PS, PSCluster
from tests.test_ps_service import bitwise_equal, grads, loss_of, mlp, specs, weights


def replicated(servers: list[PS]) -> ShardPlacement:
    # Small split threshold: the first layer's weight is cut by rows, so groups hold slices.
    return place(specs(mlp()), [s.ps_id for s in servers], min_split_bytes=256, replicas=2)


def two_servers(ps_cluster: PSCluster) -> tuple[list[PS], ShardPlacement, PSTier]:
    """Two PS, each the primary of one group and the backup of the other, with shards."""
    servers = ps_cluster.start(2)
    placement = replicated(servers)
    tier = ps_cluster.tier(servers, placement)
    tier.init(weights(mlp()), "sgd", {"lr": 0.1}, -1, 1, 0)
    return servers, placement, tier


def copies(servers: list[PS], group: str):
    """The (primary, backup) shards of ``group`` as the servers hold them."""
    by_id = {s.ps_id: s for s in servers}
    held = [s.servicer.shard(JOB, group) for s in by_id.values() if s.servicer.shard(JOB, group)]
    primary = next(c for c in held if not c.backup)
    backup = next(c for c in held if c.backup)
    return primary, backup


def assert_copies_equal(servers: list[PS], placement: ShardPlacement) -> None:
    for g in placement.groups:
        primary, backup = copies(servers, g)
        # Under the locks, as every reader: a backup answers before it steps, under its lock.
        with primary.lock, backup.lock:
            _assert_equal(g, primary, backup)


def _assert_equal(g, primary, backup) -> None:
    assert primary.version == backup.version
    for a, b in zip(primary.params, backup.params, strict=True):
        assert bitwise_equal(a.detach(), b.detach())
    sa, sb = primary.optimizer.state_dict()["state"], backup.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert bitwise_equal(v, sb[i][k]), f"group {g} optimizer {k} of #{i} differs"
    assert primary.last_push == backup.last_push


def step(model, tier, index: int, push_id: int, compression: str = "none"):
    versions = tier.pull_into(weights(model))
    model.zero_grad(set_to_none=True)
    loss_of(model, index).backward()
    return tier.push(grads(model), versions, compression, push_id=push_id)


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_both_copies_apply_every_asynchronous_push_bit_for_bit(
    ps_cluster: PSCluster, compression: str
) -> None:
    servers = ps_cluster.start(3)
    placement = replicated(servers)
    tiers = [ps_cluster.tier(servers, placement, worker_id=f"w.{i}") for i in range(2)]
    assert tiers[0].init(weights(mlp()), "adam", {"lr": 0.01}, -1, 2, 0) == dict.fromkeys(
        placement.groups, True
    )
    models = [mlp(), mlp()]
    with ThreadPoolExecutor(2) as pool:  # two workers race: the primary decides the order
        for i in range(10):
            list(
                pool.map(
                    lambda w, i=i: step(
                        models[w], tiers[w], 2 * i + w, 100 * w + i + 1, compression
                    ),
                    range(2),
                )
            )
    assert {tiers[0].info()[g].version for g in placement.groups} == {20}
    assert_copies_equal(servers, placement)


def test_a_synchronous_round_is_applied_on_both_copies(ps_cluster: PSCluster) -> None:
    servers = ps_cluster.start(2)
    placement = replicated(servers)
    tiers = [ps_cluster.tier(servers, placement, worker_id=f"w.{i}") for i in range(2)]
    tiers[0].init(weights(mlp()), "sgd", {"lr": 0.1, "momentum": 0.9}, 0, 2, 0)
    models = [mlp(), mlp()]
    with ThreadPoolExecutor(2) as pool:
        for i in range(5):
            list(
                pool.map(
                    lambda w, i=i: step(models[w], tiers[w], 2 * i + w, 10 * i + w + 1), range(2)
                )
            )
    assert {tiers[0].info()[g].version for g in placement.groups} == {5}
    assert_copies_equal(servers, placement)


def test_a_push_sent_again_is_applied_once(ps_cluster: PSCluster) -> None:
    servers, placement, tier = two_servers(ps_cluster)
    model = mlp()
    versions = tier.pull_into(weights(model))
    loss_of(model, 0).backward()
    g = {n: t.clone() for n, t in grads(model).items()}
    first = tier.push(g, versions, push_id=7)
    again = tier.push(g, versions, push_id=7)
    assert {o.version for o in first.values()} == {o.version for o in again.values()} == {1}
    assert all(o.applied for o in again.values())
    # Another push id is another push, though its gradient is the same.
    assert {o.version for o in tier.push(g, versions, push_id=8).values()} == {2}
    assert_copies_equal(servers, placement)


def test_a_backup_that_does_not_answer_fails_the_push_on_both_copies(
    ps_cluster: PSCluster,
) -> None:
    servers, placement, tier = two_servers(ps_cluster)
    model = mlp()
    step(model, tier, 0, 1)
    group_on_0 = next(g for g in placement.groups if placement.holders(g)[0] == "ps-0")
    primary = servers[0].servicer.shard(JOB, group_on_0)
    before = (primary.version, [p.detach().clone() for p in primary.params])
    ps_cluster.kill(servers[1])  # the backup of ps-0's group, and a primary
    solo = ps_cluster.tier(
        servers, ShardPlacement(tuple(placement.in_group(group_on_0)), {})
    )  # only the group whose primary is alive
    versions = solo.pull_into(weights(model))
    loss_of(model, 1).backward()
    with pytest.raises(PSUnavailable, match="backup"):
        solo.push(grads(model), versions, push_id=2)
    assert primary.version == before[0]
    for a, b in zip(before[1], primary.params, strict=True):
        assert bitwise_equal(a, b.detach())
    assert primary.stats.snapshot().pushes_rejected == {"replica_unavailable": 1}


def test_a_worker_cannot_push_to_a_backup(ps_cluster: PSCluster) -> None:
    servers, placement, tier = two_servers(ps_cluster)
    g = placement.groups[0]
    primary, backup = placement.holders(g)
    # A stale placement that still names the backup as the group's primary.
    swapped = ShardPlacement(
        tuple(dataclasses.replace(s, ps_id=backup, backup=primary) for s in placement.in_group(g)),
        {},
    )
    wrong = ps_cluster.tier(servers, swapped)
    model = mlp()
    versions = wrong.pull_into(weights(model))  # reading a backup is harmless
    loss_of(model, 0).backward()
    with pytest.raises(Fenced, match="backup"):
        wrong.push(grads(model), versions, push_id=1)
    assert_copies_equal(servers, placement)


def test_an_update_forwarded_out_of_order_is_refused(ps_cluster: PSCluster) -> None:
    servers, placement, tier = two_servers(ps_cluster)
    g = placement.groups[0]
    _, backup_ps = placement.holders(g)
    backup = next(s for s in servers if s.ps_id == backup_ps)
    shard = backup.servicer.shard(JOB, g)
    before = [p.detach().clone() for p in shard.params]
    header = ps_pb2.ReplicateHeader(
        fence=ps_pb2.Fence(job_id=JOB, generation=1, shard=g),
        version=5,
        workers=["w.0"],
        push_ids=[1],
    )
    chunks = [
        ps_pb2.ReplicateRequest(
            chunk=ps_pb2.Chunk(index=i, offset=0, data=bytes(p.detach().numpy().tobytes()))
        )
        for i, p in enumerate(shard.params)
    ]
    with pytest.raises(grpc.RpcError) as err:
        ps_cluster.stub(backup).Replicate(
            iter([ps_pb2.ReplicateRequest(header=header), *chunks]), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version 0" in err.value.details()
    assert shard.version == 0
    for a, b in zip(before, shard.params, strict=True):
        assert bitwise_equal(a, b.detach())
    assert torch.equal(before[0], shard.params[0].detach())


# -- the controller's failover, against real servers ------------------------------


def snapshot_of(spec_fields: dict, placement: ShardPlacement, generation: int) -> JobSnapshot:
    spec = parse_spec(
        {"name": "t", "mode": "ps-async", "task": "x.py", "steps": 100, **spec_fields}
    )
    record = JobRecord(JOB, "t", "ps-async", state=RUNNING, generation=generation)
    gen = assign_ranks(JOB, generation, ["node-0.0"])
    return JobSnapshot(spec, record, gen, placement=placement)


def test_failover_fills_a_new_backup_that_then_follows_its_primary(ps_cluster: PSCluster) -> None:
    servers = ps_cluster.start(3)
    live = {s.ps_id: s.servicer.incarnation for s in servers}
    placement = replicated(servers).with_incarnations(live)
    tier = ps_cluster.tier(servers, placement)
    fields = {"optimizer": {"name": "adam", "lr": 0.01}, "ps": {"replicas": 2}}
    tier.init(weights(mlp()), "adam", {"lr": 0.01}, -1, 1, 100)
    model = mlp()
    for i in range(3):
        step(model, tier, i, i + 1)
    lost = servers[1]
    ps_cluster.kill(lost)
    alive = [s for s in servers if s is not lost]
    cluster = ClusterSnapshot(
        {},
        {s.ps_id: s.address for s in alive},
        ps_incarnations={s.ps_id: live[s.ps_id] for s in alive},
    )
    gen = assign_ranks(JOB, 2, ["node-0.0"])
    moved, summary = fail_over(snapshot_of(fields, placement, 1), cluster, gen)
    assert lost.ps_id not in moved.ps_ids and all(moved.holders(g)[1] for g in moved.groups)
    assert "served by their backups" in summary
    assert_copies_equal(alive, moved)
    # The new generation trains on: every update reaches both copies, the old one is fenced.
    after = ps_cluster.tier(alive, moved, generation=2)
    for i in range(3, 6):
        step(model, after, i, i + 1)
    assert {after.info()[g].version for g in moved.groups} == {6}
    assert_copies_equal(alive, moved)
    with pytest.raises(Fenced):
        ps_cluster.tier(alive, moved, generation=1).pull_into(weights(model))


def test_failover_before_any_shard_exists_leaves_creation_to_the_workers(
    ps_cluster: PSCluster,
) -> None:
    servers = ps_cluster.start(3)
    live = {s.ps_id: s.servicer.incarnation for s in servers}
    placement = replicated(servers).with_incarnations(live)
    alive = servers[:2]
    cluster = ClusterSnapshot(
        {},
        {s.ps_id: s.address for s in alive},
        ps_incarnations={s.ps_id: live[s.ps_id] for s in alive},
    )
    fields = {"ps": {"replicas": 2}}
    moved, _ = fail_over(snapshot_of(fields, placement, 1), cluster, assign_ranks(JOB, 2, ["n.0"]))
    tier = ps_cluster.tier(alive, moved, generation=2)
    assert all(tier.init(weights(mlp()), "sgd", {"lr": 0.1}, -1, 1, 0).values())
    step(mlp(), tier, 0, 1)
    assert_copies_equal(alive, moved)
