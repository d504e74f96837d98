"""The synchronous parameter server (``max_staleness: 0``) over real gRPC on loopback.

Pins: a round collects one push per worker of the generation and applies their
mean in exactly one optimizer step, whatever order the pushes arrive in; every
pusher is answered only once its round is applied; a round that cannot
complete (generation changed, timeout, caller gone) releases its pushers with
ABORTED and leaves the shard as it was; a second push from one worker in one
round is refused.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from torch import nn

from elasticd.optimizers import build_optimizer
from elasticd.ps_client import PSTier, PushOutcome
from elasticd.ps_control import advance_fence
from elasticd.ps_errors import DuplicatePush, StaleGradient
from elasticd.retry import wait_until
from elasticd.rpc import ps_pb2
from elasticd.wire import as_bytes
from tests.fixtures.ps import JOB, PS, PSCluster
from tests.test_ps_service import (
    assert_same_state,
    bitwise_equal,
    grads,
    loss_of,
    mlp,
    placement_for,
    pulled,
    shard_state,
    weights,
)

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

KWARGS = {"lr": 0.05, "momentum": 0.9}


def gradient(model: nn.Module, tier: PSTier, index: int) -> tuple[dict, dict]:
    """Pull into ``model``, compute the gradient of batch ``index``; (grads, versions)."""
    versions = tier.pull_into(weights(model))
    model.zero_grad(set_to_none=True)
    loss_of(model, index).backward()
    return {n: g.clone() for n, g in grads(model).items()}, versions


def workers_tiers(ps_cluster: PSCluster, servers: list[PS], n: int, generation: int = 1):
    placement = placement_for(mlp(), servers)
    return [
        ps_cluster.tier(servers, placement, generation=generation, worker_id=f"w.{i}")
        for i in range(n)
    ]


def push_in_background(
    pool: ThreadPoolExecutor, tier: PSTier, g: dict, versions: dict
) -> Future[dict[str, PushOutcome]]:
    return pool.submit(tier.push, g, versions)


def wait_pending(servers: list[PS], workers: list[str]) -> None:
    wait_until(
        lambda: all(ps.servicer.shard(JOB).pending_workers() == workers for ps in servers),
        timeout=10,
        what=f"pushes of {workers} waiting in the round on every PS",
    )


@pytest.mark.parametrize("n_workers", [2, 3])
def test_round_applies_the_mean_gradient_once(
    ps_cluster: PSCluster, n_workers: int, rpc_path: str
) -> None:
    servers = ps_cluster.start(2)
    tiers = workers_tiers(ps_cluster, servers, n_workers)
    models = [mlp() for _ in tiers]
    tiers[0].init(weights(models[0]), "sgd", KWARGS, 0, n_workers, 0)

    local = mlp()
    opt = build_optimizer("sgd", KWARGS, local.parameters())
    with ThreadPoolExecutor(n_workers) as pool:
        for step in range(3):
            pushes = []
            contributions = []
            # Workers pushed in reverse order: the mean must not depend on arrival order.
            for rank in reversed(range(n_workers)):
                g, versions = gradient(models[rank], tiers[rank], 10 * step + rank)
                assert set(versions.values()) == {step}
                contributions.append((rank, g))
                pushes.append(push_in_background(pool, tiers[rank], g, versions))
                if rank:
                    # Every pusher but the last is still waiting for its round.
                    wait_pending(servers, [f"w.{r}" for r in range(rank, n_workers)])
                    assert not pushes[-1].done()
            for f in pushes:
                outcomes = f.result(timeout=30)
                assert {(o.version, o.applied, o.staleness) for o in outcomes.values()} == {
                    (step + 1, True, 0)
                }
            # The same step locally on the mean gradient, summed in worker order.
            by_rank = dict(contributions)
            opt.zero_grad(set_to_none=True)
            for name, p in local.named_parameters():
                total = by_rank[0][name].clone()
                for rank in range(1, n_workers):
                    total += by_rank[rank][name]
                p.grad = total / n_workers
            opt.step()

    remote = pulled(tiers[0], local)
    for name, p in local.named_parameters():
        assert bitwise_equal(remote[name], p.detach()), f"{name} differs"
    for ps in servers:
        shard = ps.servicer.shard(JOB)
        assert shard.version == 3  # one optimizer step per round, not per push
        assert shard.pushes_applied == 3 * n_workers
        assert shard.pending_workers() == []


def test_second_push_from_one_worker_in_a_round_is_refused(ps_cluster: PSCluster) -> None:
    servers = ps_cluster.start(1)
    w0, w1 = workers_tiers(ps_cluster, servers, 2)
    w0_again = workers_tiers(ps_cluster, servers, 1)[0]  # another client with worker id w.0
    m0, m1 = mlp(), mlp()
    w0.init(weights(m0), "sgd", {"lr": 0.1}, 0, 2, 0)

    g0, v0 = gradient(m0, w0, 0)
    g1, v1 = gradient(m1, w1, 1)
    with ThreadPoolExecutor(2) as pool:
        first = push_in_background(pool, w0, g0, v0)
        wait_pending(servers, ["w.0"])
        doubled = {n: 2 * g for n, g in g0.items()}
        with pytest.raises(DuplicatePush, match="'w.0' already pushed for version 0"):
            w0_again.push(doubled, v0)
        assert servers[0].servicer.shard(JOB).pending_workers() == ["w.0"]
        second = push_in_background(pool, w1, g1, v1)
        assert first.result(timeout=30)["ps-0"].version == 1
        assert second.result(timeout=30)["ps-0"].version == 1

    # The round applied w.0's first gradient, not the refused one.
    expected = mlp()
    opt = build_optimizer("sgd", {"lr": 0.1}, expected.parameters())
    for n, p in expected.named_parameters():
        p.grad = (g0[n] + g1[n]) / 2
    opt.step()
    remote = pulled(w0, expected)
    for n, p in expected.named_parameters():
        assert bitwise_equal(remote[n], p.detach()), n


def test_generation_change_releases_the_round_unapplied(ps_cluster: PSCluster) -> None:
    servers = ps_cluster.start(2)
    w0, w1 = workers_tiers(ps_cluster, servers, 2)
    m0, m1 = mlp(), mlp()
    w0.init(weights(m0), "sgd", KWARGS, 0, 2, 0)
    before = [shard_state(ps) for ps in servers]

    g0, v0 = gradient(m0, w0, 0)
    with ThreadPoolExecutor(1) as pool:
        waiting = push_in_background(pool, w0, g0, v0)
        wait_pending(servers, ["w.0"])
        # The controller seals generation 2 (one worker left, one joined).
        assert advance_fence(JOB, 2, 2, {ps.ps_id: ps.address for ps in servers}) == {}
        with pytest.raises(StaleGradient, match="generation changed from 1 to 2"):
            waiting.result(timeout=30)
    for ps, b in zip(servers, before, strict=True):
        assert_same_state(b, shard_state(ps))
        assert ps.servicer.shard(JOB).pending_workers() == []

    # Generation 2 trains: its two workers complete a round.
    n0, n1 = workers_tiers(ps_cluster, servers, 2, generation=2)
    g0, v0 = gradient(m0, n0, 2)
    g1, v1 = gradient(m1, n1, 3)
    with ThreadPoolExecutor(2) as pool:
        futures = [push_in_background(pool, n0, g0, v0), push_in_background(pool, n1, g1, v1)]
        assert all(o.version == 1 for f in futures for o in f.result(timeout=30).values())


def test_round_that_times_out_leaves_nothing_behind(ps_cluster: PSCluster) -> None:
    servers = ps_cluster.start(1, sync_timeout_s=0.3)
    w0, w1 = workers_tiers(ps_cluster, servers, 2)
    m0, m1 = mlp(), mlp()
    w0.init(weights(m0), "sgd", {"lr": 0.1}, 0, 2, 0)
    before = shard_state(servers[0])

    lonely, v = gradient(m0, w0, 0)
    with pytest.raises(StaleGradient, match=r"timed out after 0.3s with 1 of 2 workers"):
        w0.push({n: 100 * g for n, g in lonely.items()}, v)
    assert_same_state(before, shard_state(servers[0]))
    assert servers[0].servicer.shard(JOB).pending_workers() == []

    # The next full round holds only the two fresh gradients.
    g0, v0 = gradient(m0, w0, 1)
    g1, v1 = gradient(m1, w1, 2)
    with ThreadPoolExecutor(2) as pool:
        futures = [push_in_background(pool, w0, g0, v0), push_in_background(pool, w1, g1, v1)]
        for f in futures:
            f.result(timeout=30)
    expected = mlp()
    opt = build_optimizer("sgd", {"lr": 0.1}, expected.parameters())
    for n, p in expected.named_parameters():
        p.grad = (g0[n] + g1[n]) / 2
    opt.step()
    remote = pulled(w0, expected)
    for n, p in expected.named_parameters():
        assert bitwise_equal(remote[n], p.detach()), n


def test_pusher_that_goes_away_is_withdrawn_from_the_round(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    (w0,) = workers_tiers(ps_cluster, [ps], 1)
    m0 = mlp()
    w0.init(weights(m0), "sgd", {"lr": 0.1}, 0, 2, 0)
    g0, _ = gradient(m0, w0, 0)
    before = shard_state(ps)

    stub = ps_cluster.stub(ps)
    header = ps_pb2.PushRequest(
        header=ps_pb2.PushHeader(
            fence=ps_pb2.Fence(job_id=JOB, generation=1), worker_id="w.9", base_version=0
        )
    )
    slices = w0.placement.in_group(ps.ps_id)
    chunks = [
        ps_pb2.PushRequest(
            chunk=ps_pb2.Chunk(
                index=i,
                offset=0,
                data=bytes(
                    as_bytes(g0[s.param] if s.whole else g0[s.param][s.row_start : s.row_end])
                ),
            )
        )
        for i, s in enumerate(slices)
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(iter([header, *chunks]), timeout=0.5)  # gives up before the round completes
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: ps.servicer.shard(JOB).pending_workers() == [], 10, "w.9 withdrawn")
    assert_same_state(before, shard_state(ps))


def test_stale_or_anonymous_push_is_refused_in_synchronous_mode(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    (w0,) = workers_tiers(ps_cluster, [ps], 1)
    m0 = mlp()
    w0.init(weights(m0), "sgd", {"lr": 0.1}, 0, 1, 0)
    old, v_old = gradient(m0, w0, 0)
    g, v = gradient(m0, w0, 1)
    assert w0.push(g, v)["ps-0"].version == 1  # one worker: every push is a full round
    before = shard_state(ps)
    with pytest.raises(StaleGradient, match="1 versions old; the job allows 0"):
        w0.push(old, v_old)
    anonymous = workers_tiers(ps_cluster, [ps], 1)[0]
    anonymous.worker_id = ""
    g, v = gradient(m0, w0, 2)
    with pytest.raises(grpc.RpcError) as err:
        anonymous.push(g, v)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker_id is empty" in err.value.details()
    assert_same_state(before, shard_state(ps))


def test_abandoned_round_does_not_block_other_jobs(ps_cluster: PSCluster) -> None:
    """A pusher waiting for its round holds one handler thread, not the server."""
    (ps,) = ps_cluster.start(1)
    (w0,) = workers_tiers(ps_cluster, [ps], 1)
    m0 = mlp()
    w0.init(weights(m0), "sgd", {"lr": 0.1}, 0, 2, 0)
    g0, v0 = gradient(m0, w0, 0)
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: (w0.push(g0, v0), done.set()))
        wait_pending([ps], ["w.0"])
        other = ps_cluster.tier([ps], w0.placement, job="job-other", worker_id="x.0")
        other.init(weights(mlp(1)), "sgd", {"lr": 0.1}, -1, 1, 0)
        g, v = gradient(mlp(1), other, 0)
        assert other.push(g, v)["ps-0"].version == 1
        assert not done.is_set()
        assert advance_fence(JOB, 2, 1, {ps.ps_id: ps.address}) == {}
        with pytest.raises(StaleGradient):
            waiting.result(timeout=30)
    assert ps.servicer.shard(JOB).version == 0
