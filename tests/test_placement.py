"""Shard placement: a pure function from parameter sizes to PS slices.

Every row of every parameter lives on exactly one PS, bytes are balanced, and
the answer depends only on the inputs (so every controller computes the same).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elasticd.placement import (
    MIN_SPLIT_BYTES,
    Copy,
    Move,
    ShardPlacement,
    Slice,
    TensorSpec,
    drain_moves,
    failover,
    place,
)
from elasticd.task import import_task_module
from elasticd.wire import DTYPES, dtype_name

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MB = 1 << 20


def charlm_tensors() -> list[TensorSpec]:
    """The parameter list of the reference job's model (examples/charlm.yaml)."""
    module = import_task_module(str(EXAMPLES / "charlm.py"))
    model = module.CharLM(context=64, d_model=128, n_layers=2, n_heads=4)
    return [
        TensorSpec(name, dtype_name(p.dtype), tuple(p.shape))
        for name, p in model.named_parameters()
    ]


def numbered(spec: TensorSpec) -> torch.Tensor:
    """A tensor of ``spec``'s shape whose every element is distinct (by position)."""
    n = 1
    for d in spec.shape:
        n *= d
    return torch.arange(n, dtype=torch.int64).reshape(spec.shape)


def slice_of(tensor: torch.Tensor, s: Slice) -> torch.Tensor:
    return tensor if s.whole else tensor[s.row_start : s.row_end]


def assert_exact_cover(tensors: Sequence[TensorSpec], placement: ShardPlacement) -> None:
    """Reassembling the slices gives back every tensor, each row exactly once."""
    by_param: dict[str, list[Slice]] = {}
    for s in placement.slices:
        by_param.setdefault(s.param, []).append(s)
    assert set(by_param) == {t.name for t in tensors}
    keys = [s.key for s in placement.slices]
    assert len(keys) == len(set(keys)), "two slices share a key"
    for t in tensors:
        slices = sorted(by_param[t.name], key=lambda s: s.row_start)
        full = numbered(t)
        if len(slices) == 1 and slices[0].whole:
            s = slices[0]
            assert s.shape == t.shape and s.dtype == t.dtype
            assert s.row_start == 0 and s.row_end == (t.shape[0] if t.shape else 0)
            continue
        assert all(not s.whole for s in slices), f"{t.name}: whole and partial slices mixed"
        assert slices[0].row_start == 0
        assert slices[-1].row_end == t.shape[0]
        for a, b in itertools.pairwise(slices):
            assert a.row_end == b.row_start, f"{t.name}: gap or overlap at row {a.row_end}"
        for s in slices:
            assert s.row_end > s.row_start, f"{t.name}: empty slice {s}"
            assert s.shape == (s.row_end - s.row_start, *t.shape[1:])
            assert s.dtype == t.dtype
        pieces = [slice_of(full, s) for s in slices]
        assert torch.equal(torch.cat(pieces), full)
    total = sum(t.nbytes for t in tensors)
    assert sum(s.nbytes for s in placement.slices) == total
    assert sum(placement.bytes_per_ps().values()) == total


def load_ratio(placement: ShardPlacement) -> float:
    loads = placement.bytes_per_ps().values()
    return max(loads) / min(loads)


# -- coverage ------------------------------------------------------------------


@pytest.mark.parametrize("servers", [1, 2, 3, 5])
@pytest.mark.parametrize("min_split", [0, 64 << 10, MIN_SPLIT_BYTES])
def test_charlm_rows_covered_exactly_once(servers: int, min_split: int) -> None:
    tensors = charlm_tensors()
    placement = place(tensors, [f"ps-{i}" for i in range(servers)], min_split_bytes=min_split)
    assert_exact_cover(tensors, placement)
    assert placement.ps_ids == [f"ps-{i}" for i in range(servers)]


def test_mixed_dtypes_and_odd_rows_covered() -> None:
    tensors = [
        TensorSpec("emb", "float32", (1001, 37)),
        TensorSpec("half", "float16", (999,)),
        TensorSpec("bf", "bfloat16", (7, 5, 3)),
        TensorSpec("idx", "int64", (13,)),
        TensorSpec("mask", "bool", (4, 4)),
        TensorSpec("scale", "float32", ()),
        TensorSpec("row", "float32", (1, 4096)),
        TensorSpec("empty", "float32", (0, 8)),
    ]
    for servers in (1, 2, 3, 4, 7):
        placement = place(tensors, [f"s{i}" for i in range(servers)], min_split_bytes=0)
        assert_exact_cover(tensors, placement)
    # With no lower bound on splitting, the big tensor is cut across servers.
    placement = place(tensors, ["s0", "s1", "s2"], min_split_bytes=0)
    assert len({s.ps_id for s in placement.slices if s.param == "emb"}) > 1


def test_slices_are_in_parameter_order() -> None:
    tensors = charlm_tensors()
    placement = place(tensors, ["a", "b", "c"], min_split_bytes=0)
    order = [t.name for t in tensors]
    seen = [s.param for s in placement.slices]
    assert sorted(seen, key=order.index) == seen


# -- balance -------------------------------------------------------------------


@pytest.mark.parametrize("servers", [2, 3, 4])
def test_charlm_bytes_balanced(servers: int) -> None:
    placement = place(charlm_tensors(), [f"ps-{i}" for i in range(servers)])
    assert len(placement.bytes_per_ps()) == servers
    assert load_ratio(placement) <= 1.10, placement.bytes_per_ps()


def test_big_tensor_split_by_rows_across_two_servers() -> None:
    big = TensorSpec("big", "float32", (16384, 1024))  # 64 MiB
    assert big.nbytes == 64 * MB
    placement = place([big], ["ps-1", "ps-0"])
    assert_exact_cover([big], placement)
    assert len(placement.slices) == 2
    assert all(not s.whole for s in placement.slices)
    assert {s.ps_id for s in placement.slices} == {"ps-0", "ps-1"}
    assert placement.bytes_per_ps() == {"ps-0": 32 * MB, "ps-1": 32 * MB}
    assert [s.key for s in placement.slices] == ["big[0:8192]", "big[8192:16384]"]


def test_big_tensor_with_model_balanced() -> None:
    big = TensorSpec("big", "float32", (16385, 1024))  # a row more than 64 MiB
    tensors = [*charlm_tensors(), big]
    for servers in (2, 3, 4):
        placement = place(tensors, [f"ps-{i}" for i in range(servers)])
        assert_exact_cover(tensors, placement)
        assert load_ratio(placement) <= 1.10, (servers, placement.bytes_per_ps())
        # No piece of the big tensor is larger than an even share.
        share = sum(t.nbytes for t in tensors) / servers
        assert max(s.nbytes for s in placement.slices if s.param == "big") <= share


def test_small_tensors_are_not_split() -> None:
    tensors = charlm_tensors()
    assert max(t.nbytes for t in tensors) < MIN_SPLIT_BYTES
    placement = place(tensors, ["a", "b", "c", "d"])
    assert all(s.whole for s in placement.slices)
    assert len(placement.slices) == len(tensors)


# -- determinism and serialisation ---------------------------------------------


def test_deterministic_regardless_of_ps_order() -> None:
    tensors = [*charlm_tensors(), TensorSpec("big", "float32", (9000, 1024))]
    ids = ["ps-c", "ps-a", "ps-d", "ps-b"]
    reference = place(tensors, ids)
    for perm in itertools.permutations(ids):
        assert place(tensors, list(perm)) == reference
    assert place(tensors, ids).to_json() == reference.to_json()


def test_json_round_trip() -> None:
    tensors = [*charlm_tensors(), TensorSpec("big", "bfloat16", (20000, 512))]
    placement = place(tensors, ["x", "y", "z"], min_split_bytes=0)
    assert any(not s.whole for s in placement.slices)
    again = ShardPlacement.from_json(placement.to_json())
    assert again == placement
    assert all(isinstance(s.shape, tuple) for s in again.slices)
    assert ShardPlacement.from_json(placement.to_json().encode()) == placement


def test_for_ps_partitions_slices() -> None:
    placement = place(charlm_tensors(), ["a", "b"], min_split_bytes=0)
    parts = [placement.in_group(p) for p in placement.ps_ids]
    assert sum(len(p) for p in parts) == len(placement.slices)
    assert {s.key for p in parts for s in p} == {s.key for s in placement.slices}


# -- tensors that must never be split ------------------------------------------


def test_zero_dim_and_single_row_never_split() -> None:
    tensors = [
        TensorSpec("scalar", "float32", ()),
        TensorSpec("one-row", "float32", (1, 8 << 20)),  # 32 MiB in one row
        TensorSpec("one-elem", "float64", (1,)),
    ]
    for servers in (2, 3, 8):
        placement = place(tensors, [f"p{i}" for i in range(servers)], min_split_bytes=0)
        assert_exact_cover(tensors, placement)
        assert len(placement.slices) == 3
        assert all(s.whole for s in placement.slices)
    scalar = next(s for s in placement.slices if s.param == "scalar")
    assert scalar.shape == () and scalar.key == "scalar"
    assert scalar.nbytes == DTYPES["float32"].itemsize


def test_no_servers_is_an_error() -> None:
    with pytest.raises(ValueError, match="no parameter server"):
        place(charlm_tensors(), [])


# -- hot replicas ---------------------------------------------------------------


def test_replicas_put_each_group_backup_on_the_next_ps_of_the_ring() -> None:
    placement = place(charlm_tensors(), ["a", "b", "c"], min_split_bytes=0, replicas=2)
    assert placement.groups == ["a", "b", "c"]
    assert {g: placement.holders(g) for g in placement.groups} == {
        "a": ("a", "b"),
        "b": ("b", "c"),
        "c": ("c", "a"),
    }
    for s in placement.slices:
        assert s.backup and s.backup != s.ps_id and s.shard == s.ps_id
    assert placement.ps_ids == ["a", "b", "c"]
    unreplicated = place(charlm_tensors(), ["a", "b", "c"], min_split_bytes=0)
    # Same slices, same primaries; each PS also carries one other group's bytes.
    assert [replace(s, backup="") for s in placement.slices] == list(unreplicated.slices)
    total = sum(unreplicated.bytes_per_ps().values())
    assert sum(placement.bytes_per_ps().values()) == 2 * total
    assert ShardPlacement.from_json(placement.to_json()) == placement


def test_one_ps_has_no_backup() -> None:
    placement = place(charlm_tensors(), ["a"], replicas=2)
    assert not placement.replicated
    assert placement.holders("a") == ("a", "")


def test_failover_promotes_the_backup_and_picks_a_new_one() -> None:
    live = {"a": "boot-a", "b": "boot-b", "c": "boot-c"}
    placement = place(charlm_tensors(), sorted(live), min_split_bytes=0, replicas=2)
    placement = placement.with_incarnations(live)
    del live["b"]
    moved, copies = failover(placement, live, replicas=2)
    # a's backup (b) is lost: a keeps serving, gets a new backup on c.
    # b's primary is lost: its backup c takes over, and gets a new backup on a.
    assert moved.holders("a") == ("a", "c")
    assert moved.holders("b") == ("c", "a")
    assert moved.holders("c") == ("c", "a")
    assert sorted(copies) == sorted([Copy("a", "a", "c"), Copy("b", "c", "a")])
    assert "b" not in moved.ps_ids and set(moved.incarnations) == {"a", "c"}
    # Groups keep their slices: a group's version and optimizer state move with it.
    for g in placement.groups:
        assert [(s.param, s.row_start, s.row_end) for s in placement.in_group(g)] == [
            (s.param, s.row_start, s.row_end) for s in moved.in_group(g)
        ]
    # Nothing lost: failing over again changes nothing.
    assert failover(moved, live, replicas=2) == (moved, [])


def test_a_ps_back_under_a_new_boot_id_holds_nothing_but_may_take_backups() -> None:
    live = {"a": "boot-a", "b": "boot-b"}
    placement = place(charlm_tensors(), sorted(live), replicas=2).with_incarnations(live)
    moved, copies = failover(placement, {"a": "boot-a", "b": "boot-b2"}, replicas=2)
    assert moved.holders("a") == ("a", "b") and moved.holders("b") == ("a", "b")
    assert sorted(copies) == [Copy("a", "a", "b"), Copy("b", "a", "b")]
    assert moved.incarnations["b"] == "boot-b2"


def test_failover_gives_up_when_a_group_lost_both_copies() -> None:
    live = {p: p for p in "abc"}
    placement = place(charlm_tensors(), sorted(live), replicas=2).with_incarnations(live)
    assert failover(placement, {"c": "c"}, replicas=2) is None  # group a was on a and b
    unreplicated = place(charlm_tensors(), sorted(live)).with_incarnations(live)
    assert failover(unreplicated, {"a": "a", "c": "c"}, replicas=1) is None


def test_the_last_ps_serves_every_group_without_a_backup() -> None:
    live = {"a": "a", "b": "b"}
    placement = place(charlm_tensors(), sorted(live), replicas=2).with_incarnations(live)
    moved, copies = failover(placement, {"a": "a"}, replicas=2)
    assert copies == [] and not moved.replicated
    assert {moved.holders(g) for g in moved.groups} == {("a", "")}
    # When a second PS registers, every group gets its backup there.
    again, copies = failover(moved, {"a": "a", "c": "c"}, replicas=2)
    assert {again.holders(g) for g in again.groups} == {("a", "c")}
    assert sorted(c.group for c in copies) == ["a", "b"]


def test_a_draining_ps_hands_its_groups_to_the_least_loaded_live_ps() -> None:
    live = {p: f"boot-{p}" for p in "abc"}
    placement = place(charlm_tensors(), sorted(live), min_split_bytes=0).with_incarnations(live)
    moved, moves = drain_moves(placement, live, frozenset({"b"}))
    target = moves[0].target
    assert moves == [Move("b", "b", target, backup=False)] and target in ("a", "c")
    assert "b" not in moved.ps_ids and moved.holders("b") == (target, "")
    assert moved.holders("a") == ("a", "") and moved.holders("c") == ("c", "")
    # Groups keep their slices: version, optimizer state and applied batches move whole.
    assert [(s.param, s.row_start) for s in moved.in_group("b")] == [
        (s.param, s.row_start) for s in placement.in_group("b")
    ]
    # Nothing left to move: draining again changes nothing.
    assert drain_moves(moved, live, frozenset({"b"})) == (moved, [])


def test_a_draining_ps_moves_its_primaries_and_its_backups() -> None:
    live = {p: p for p in "abc"}
    placement = place(charlm_tensors(), sorted(live), replicas=2).with_incarnations(live)
    moved, moves = drain_moves(placement, live, frozenset({"b"}))
    # b was the primary of b (backup c) and the backup of a (primary a).
    assert sorted(moves) == [Move("a", "a", "c", backup=True), Move("b", "b", "a", backup=False)]
    assert moved.holders("a") == ("a", "c") and moved.holders("b") == ("a", "c")
    assert "b" not in moved.ps_ids


def test_a_drain_with_no_other_live_ps_moves_nothing() -> None:
    live = {"a": "a"}
    placement = place(charlm_tensors(), ["a"]).with_incarnations(live)
    assert drain_moves(placement, live, frozenset({"a"})) is None
    two = {"a": "a", "b": "b"}
    replicated = place(charlm_tensors(), ["a", "b"], replicas=2).with_incarnations(two)
    assert drain_moves(replicated, two, frozenset({"a", "b"})) is None


def test_a_draining_ps_hands_its_primary_to_its_backup_when_no_other_ps_is_free() -> None:
    two = {"a": "a", "b": "b"}
    replicated = place(charlm_tensors(), ["a", "b"], replicas=2).with_incarnations(two)
    moved, moves = drain_moves(replicated, two, frozenset({"a"}))
    # a was the primary of a (backup b) and the backup of b: b takes a's group over,
    # copied whole from a, and b's group runs without a backup.
    assert moves == [Move("a", "a", "b", backup=False)]
    assert moved.holders("a") == ("b", "") and moved.holders("b") == ("b", "")
    assert moved.ps_ids == ["b"] and drain_moves(moved, two, frozenset({"a"})) == (moved, [])
