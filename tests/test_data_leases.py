"""Batch sets, the controller's data-lease decisions, and a shard's applied set."""

from __future__ import annotations

import random

import pytest
import torch

from elasticd.batches import BatchSet
from elasticd.server.controller.data_leases import DataQueue, Lease, lease, rebuilt
from elasticd.server.ps.rules import BadRequest, ShardConfig, forwarded_contributors
from elasticd.server.ps.shard import ParameterShard
from elasticd.server.ps.transfer import export_shard, import_shard
from elasticd.wire import TensorHeader


def test_batch_set_merges_ranges_and_matches_a_plain_set():
    rng = random.Random(7)
    plain: set[int] = set()
    s = BatchSet()
    for _ in range(500):
        start = rng.randrange(200)
        end = start + rng.randrange(6)
        s.add_range(start, end)
        plain.update(range(start, end))
        assert len(s) == len(plain)
    assert all((i in s) == (i in plain) for i in range(-2, 210))
    ranges = s.ranges()
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # disjoint, apart
    assert BatchSet.from_flat(s.flat()) == s
    gaps = BatchSet(s.gaps(220))
    assert all((i in gaps) != (i in plain) for i in range(220))


def test_batch_set_intersection_and_bad_ranges():
    a, b = BatchSet([(0, 10), (20, 30)]), BatchSet([(5, 25)])
    assert a.intersection(b).ranges() == [(5, 10), (20, 25)]
    assert a.end() == 30 and BatchSet().end() == 0
    with pytest.raises(ValueError):
        BatchSet([(5, 2)])
    with pytest.raises(ValueError):
        BatchSet.from_flat([1, 2, 3])


def ask(q, holder, worker, finished=(), members=("w0", "w1")):
    return lease(
        q, holder=holder, worker=worker, finished=list(finished), members=frozenset(members)
    )


def test_a_holder_gets_its_range_again_until_it_finishes_it():
    q = DataQueue(shard_batches=4)
    d = ask(q, "h0", "w0")
    assert (d.lease.start, d.lease.end) == (0, 4)
    again = ask(d.queue, "h0", "w0")  # the answer was lost: same range
    assert again.lease == d.lease and again.queue == d.queue
    nxt = ask(d.queue, "h0", "w0", finished=[(0, 4)])
    assert (nxt.lease.start, nxt.lease.end) == (4, 8)
    assert nxt.queue.leases == (Lease("h0", "w0", 4, 8),)


def test_a_departed_or_restarted_worker_gives_its_range_back():
    q = ask(DataQueue(shard_batches=4), "h0", "w0").queue
    q = ask(q, "h1", "w1").queue  # w1 holds 4-8
    # w0 left the generation: its range goes to the next to ask, before new batches
    d = ask(q, "h1", "w1", finished=[(4, 8)], members=("w1",))
    assert (d.lease.start, d.lease.end) == (0, 4) and d.queue.reclaimed == 1
    # w1 restarted (a new holder under the same worker id): its range comes back to it
    d2 = ask(d.queue, "h2", "w1", members=("w1",))
    assert (d2.lease.start, d2.lease.end) == (0, 4) and d2.queue.leases == (
        Lease("h2", "w1", 0, 4),
    )


def test_the_next_epoch_waits_until_every_range_of_this_one_is_finished():
    q = DataQueue(shard_batches=4, epoch_batches=6)
    a = ask(q, "h0", "w0")  # 0-4
    b = ask(a.queue, "h1", "w1")  # 4-6: the epoch's end cuts the range
    assert (b.lease.start, b.lease.end) == (4, 6)
    wait = ask(b.queue, "h1", "w1", finished=[(4, 6)])
    assert wait.lease is None and wait.epoch == 0  # 0-4 is still out
    done = ask(wait.queue, "h0", "w0", finished=[(0, 4)])
    assert (done.lease.start, done.lease.end, done.epoch) == (6, 10, 1)


def test_a_queue_rebuilt_from_a_checkpoint_hands_out_what_it_lacks():
    done = BatchSet([(0, 10), (14, 20)])
    q = rebuilt(4, 0, (3, 0), done, 22)
    assert q.requeued == ((10, 14), (20, 22)) and q.next == 22 and q.origin == (3, 0)
    assert DataQueue.from_json(q.to_json()) == q


def shard(max_staleness: int = -1) -> ParameterShard:
    config = ShardConfig("j", "sgd", {"lr": 1.0}, max_staleness=max_staleness)
    return ParameterShard(config, 1, [TensorHeader("w", "float32", (3,))], [torch.zeros(3)])


def test_a_shard_applies_each_batch_once_and_exports_its_applied_set():
    s = shard()
    one = torch.tensor([1.0, 0.0, 0.0])
    assert s.apply(1, 0, [one], worker_id="a", push_id=1, batch=7).applied
    again = s.apply(1, 1, [one], worker_id="b", push_id=1, batch=7)
    assert (again.applied, again.duplicate, s.version) == (False, True, 1)
    assert s.apply(1, 1, [one], worker_id="b", push_id=2).applied  # no batch: never refused
    assert torch.equal(s.params[0].detach(), torch.tensor([-2.0, 0.0, 0.0]))
    data, version, applied = export_shard(s, 1)
    assert (version, applied.ranges()) == (2, [(7, 8)])
    copy = import_shard(s.config, 1, s.headers, data, version)
    assert copy.apply(1, 2, [one], worker_id="c", push_id=1, batch=7).duplicate


def test_a_synchronous_round_records_its_batches():
    s = shard(max_staleness=0)
    s.apply(1, 0, [torch.ones(3)], worker_id="a", push_id=1, batch=3, workers=1)
    assert s.applied.ranges() == [(3, 4)]
    assert s.apply(1, 1, [torch.ones(3)], worker_id="a", push_id=2, batch=3, workers=1).duplicate


def test_forwarded_batches_are_checked():
    assert forwarded_contributors(["a"], [1], []) == [("a", 1, -1)]
    assert forwarded_contributors(["a", "b"], [1, 2], [5, -1]) == [("a", 1, 5), ("b", 2, -1)]
    with pytest.raises(BadRequest):
        forwarded_contributors(["a"], [1], [1, 2])
    with pytest.raises(BadRequest):
        forwarded_contributors(["a"], [1], [-3])


def test_a_restore_keeps_the_checkpoint_groups_on_fewer_ps():
    from elasticd.placement import TensorSpec, place, rehome

    saved = place([TensorSpec("a", "float32", (300,)), TensorSpec("b", "float32", (100,))],
                  ["ps-0", "ps-1", "ps-2"])  # fmt: skip
    moved = rehome(saved, ["ps-0", "ps-9"])
    assert moved.groups == saved.groups  # whole groups, under their names
    for g in saved.groups:
        assert [s.key for s in moved.in_group(g)] == [s.key for s in saved.in_group(g)]
    assert set(moved.ps_ids) == {"ps-0", "ps-9"}
    assert not moved.replicated
    ring = rehome(saved, ["ps-0", "ps-9"], replicas=2)
    assert all(ring.holders(g)[0] != ring.holders(g)[1] for g in ring.groups)
