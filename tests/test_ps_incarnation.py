"""A PS never re-creates slices it lost: incarnations, fences without a shard, round sizes.

Real gRPC servers on loopback. A restarted PS is a new servicer under the
same id (a new boot id), as a process restarted by systemd would be.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from elasticd.ps_control import advance_fence, drop_shards, shard_infos
from elasticd.ps_errors import Fenced, ShardLost
from elasticd.server.controller.finishing import release_shards
from elasticd.slicing import join_slices, split_state
from tests.fixtures.ps import JOB, PSCluster
from tests.test_ps_service import mlp, placement_for, weights
from tests.test_ps_sync import gradient

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

OPT = ("sgd", {"lr": 0.1})


def test_registration_carries_a_boot_id_that_a_restart_changes(ps_cluster: PSCluster) -> None:
    first, again = ps_cluster.start(2)
    assert first.servicer.incarnation and again.servicer.incarnation
    assert first.servicer.incarnation != again.servicer.incarnation
    info = shard_infos(JOB, {first.ps_id: first.address})[first.ps_id]
    assert not info.exists and info.incarnation == first.servicer.incarnation


def test_a_restarted_ps_refuses_to_recreate_a_placed_shard(ps_cluster: PSCluster) -> None:
    (old,) = ps_cluster.start(1)
    model = mlp()
    placement = placement_for(model, [old]).with_incarnations({old.ps_id: "boot-before-restart"})
    tier = ps_cluster.tier([old], placement)
    with pytest.raises(ShardLost, match="restarted since job job-ps was placed on it"):
        tier.init(weights(model), *OPT, -1, 1, 0)
    assert old.servicer.shard(JOB) is None

    # The incarnation the controller placed the job on may create it.
    placed = placement.with_incarnations({old.ps_id: old.servicer.incarnation})
    assert ps_cluster.tier([old], placed).init(weights(model), *OPT, -1, 1, 0) == {old.ps_id: True}


def test_a_dropped_shard_is_never_created_again(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    model = mlp()
    tier = ps_cluster.tier([ps], placement_for(model, [ps]))
    tier.init(weights(model), *OPT, -1, 1, 0)
    assert drop_shards(JOB, 1, {ps.ps_id: ps.address}) == {}
    with pytest.raises(ShardLost, match="dropped job job-ps's shard"):
        tier.init(weights(model), *OPT, -1, 1, 0)
    assert ps.servicer.shard(JOB) is None


def test_a_late_import_does_not_bring_back_a_dropped_job(ps_cluster: PSCluster) -> None:
    """A restore or failover import that lands after the job ended (and its shard was
    dropped) is refused: it would leave a dead job's state on the PS for good."""
    (ps,) = ps_cluster.start(1)
    model = mlp()
    placement = placement_for(model, [ps])
    tier = ps_cluster.tier([ps], placement)
    tier.init(weights(model), *OPT, -1, 1, 0)
    state = join_slices(placement, tier.export_state())
    assert drop_shards(JOB, 1, {ps.ps_id: ps.address}) == {}
    late = ps_cluster.tier([ps], placement, generation=2)
    with pytest.raises(Fenced, match="dropped job job-ps's shards"):
        late.import_state(split_state(placement, *state), *OPT, -1, 1, 0, version=3)
    assert ps.servicer.shard(JOB) is None
    # And below a fence raised without a shard, an import of an older generation is stale.
    assert advance_fence("other", 5, 1, {ps.ps_id: ps.address}) == {}
    older = ps_cluster.tier([ps], placement, generation=4, job="other")
    with pytest.raises(Fenced, match="generation 4 is stale"):
        older.import_state(split_state(placement, *state), *OPT, -1, 1, 0, version=3)
    assert ps.servicer.shard("other") is None


def test_a_fence_without_a_shard_refuses_an_older_generations_init(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    model = mlp()
    placement = placement_for(model, [ps])
    assert advance_fence(JOB, 3, 1, {ps.ps_id: ps.address}) == {}  # NOT_FOUND, floor kept
    with pytest.raises(ShardLost, match="generation 2 is stale"):
        ps_cluster.tier([ps], placement, generation=2).init(weights(model), *OPT, -1, 1, 0)
    assert ps.servicer.shard(JOB) is None
    assert ps_cluster.tier([ps], placement, generation=3).init(weights(model), *OPT, -1, 1, 0)


def test_a_fence_names_the_ps_that_did_not_answer(ps_cluster: PSCluster) -> None:
    (ps,) = ps_cluster.start(1)
    missed = advance_fence(JOB, 2, 1, {ps.ps_id: ps.address, "ps-gone": "127.0.0.1:1"})
    assert list(missed) == ["ps-gone"] and missed["ps-gone"].startswith("UNAVAILABLE")


def test_a_synchronous_round_follows_the_pushers_generation_size(ps_cluster: PSCluster) -> None:
    """Two workers in generation 1; generation 2 has one. Its push alone completes a round,
    even though no AdvanceGeneration ever told the PS the size changed."""
    (ps,) = ps_cluster.start(1)
    model = mlp()
    placement = placement_for(model, [ps])
    gen1 = [ps_cluster.tier([ps], placement, generation=1, worker_id=f"w.{i}") for i in range(2)]
    for t in gen1:
        t.workers = 2
    gen1[0].init(weights(model), "sgd", {"lr": 0.1}, 0, 2, 0)
    models = [mlp(), mlp()]
    with ThreadPoolExecutor(2) as pool:
        pushes = [
            pool.submit(t.push, *gradient(m, t, i))
            for i, (t, m) in enumerate(zip(gen1, models, strict=True))
        ]
        assert {o.version for f in pushes for o in f.result(timeout=30).values()} == {1}

    survivor = ps_cluster.tier([ps], placement, generation=2, worker_id="w.0")
    survivor.workers = 1
    for step in range(1, 4):
        outcomes = survivor.push(*gradient(models[0], survivor, 10 + step))
        assert {(o.version, o.applied) for o in outcomes.values()} == {(step + 1, True)}
    assert ps.servicer.shard(JOB).config.workers == 1


def test_placement_json_keeps_incarnations_and_reads_the_old_form() -> None:
    from elasticd.placement import ShardPlacement, TensorSpec, place

    p = place([TensorSpec("w", "float32", (4, 4))], ["ps-0"]).with_incarnations({"ps-0": "b1"})
    assert ShardPlacement.from_json(p.to_json()) == p
    old_form = "[" + p.to_json().split("[", 1)[1].rsplit("]", 1)[0] + "]"
    assert ShardPlacement.from_json(old_form) == replace(p, incarnations={})


def test_a_job_end_drops_stale_copies_outside_its_placement(ps_cluster: PSCluster) -> None:
    """A PS that came back after the job moved elsewhere still holds its old copy: the
    job's end drops it too, so it does not hold that memory until it restarts."""
    placed, stale = ps_cluster.start(2)
    model = mlp()
    for ps in (placed, stale):
        ps_cluster.tier([ps], placement_for(model, [ps])).init(weights(model), *OPT, -1, 1, 0)
    registered = {ps.ps_id: ps.address for ps in (placed, stale)}
    assert release_shards(JOB, placement_for(model, [placed]), registered) == {}
    assert placed.servicer.shard(JOB) is None and stale.servicer.shard(JOB) is None
