"""Membership and the controller's decisions, as pure functions of snapshots.

Invariant 3: membership is a sequence of sealed generations with ranks derived
deterministically from the set of workers. No etcd, no gRPC: these are the
plain functions the reconcile loop calls.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import replace

import pytest

from elasticd.coord.etcd import Delete
from elasticd.coord.keys import Keys
from elasticd.jobspec import parse_spec
from elasticd.membership import (
    Generation,
    NodeInfo,
    WorkerReport,
    assign_ranks,
    choose_workers,
    split_worker_id,
    worker_id,
)
from elasticd.placement import TensorSpec, place
from elasticd.server.controller.planning import (
    ClusterSnapshot,
    Complete,
    Fail,
    JobSnapshot,
    Nothing,
    Seal,
    Wait,
    decide,
    running_members,
    seal_at_once,
)
from elasticd.server.controller.progress import ProgressBook
from elasticd.server.controller.records import (
    COMPLETED,
    FAILED,
    RUNNING,
    WAITING,
    JobRecord,
)
from elasticd.server.controller.sealing import seal_ops

JOB = "job-1"


def nodes(**slots: int) -> dict[str, NodeInfo]:
    return {n: NodeInfo(n, s) for n, s in slots.items()}


# -- worker ids and ranks ------------------------------------------------------


def test_worker_id_round_trip() -> None:
    assert worker_id("node-a", 3) == "node-a.3"
    assert split_worker_id("node-a.3") == ("node-a", 3)
    # Node ids may themselves contain dots (host names).
    assert split_worker_id(worker_id("host.example.com", 12)) == ("host.example.com", 12)


def test_ranks_deterministic_from_the_set_alone() -> None:
    wids = ["b.1", "a.0", "c.0", "a.2", "b.0", "a.10", "a.1"]
    reference = assign_ranks(JOB, 4, wids)
    rng = random.Random(7)
    for _ in range(50):
        shuffled = wids[:]
        rng.shuffle(shuffled)
        assert assign_ranks(JOB, 4, shuffled) == reference
    assert assign_ranks(JOB, 4, set(wids)) == reference
    assert assign_ranks(JOB, 4, iter(wids)) == reference
    # Ranks follow (node, numeric slot): a.10 comes after a.2.
    assert [m.worker_id for m in reference.members] == [
        "a.0",
        "a.1",
        "a.2",
        "a.10",
        "b.0",
        "b.1",
        "c.0",
    ]
    assert [m.rank for m in reference.members] == list(range(7))
    assert reference.world_size == 7
    assert reference.number == 4 and reference.job_id == JOB


def test_local_ranks_count_per_node() -> None:
    gen = assign_ranks(JOB, 1, ["n2.1", "n1.3", "n2.0", "n1.0", "n3.5"])
    local = {m.worker_id: (m.node_id, m.local_rank) for m in gen.members}
    assert local == {
        "n1.0": ("n1", 0),
        "n1.3": ("n1", 1),
        "n2.0": ("n2", 0),
        "n2.1": ("n2", 1),
        "n3.5": ("n3", 0),
    }
    assert gen.nodes == ["n1", "n2", "n3"]
    assert [m.worker_id for m in gen.on_node("n2")] == ["n2.0", "n2.1"]


def test_generation_json_round_trip() -> None:
    gen = assign_ranks(JOB, 9, ["x.0", "y.0", "x.1"])
    assert Generation.from_json(gen.to_json()) == gen
    assert gen.worker_ids == frozenset({"x.0", "y.0", "x.1"})


def test_records_json_round_trip() -> None:
    info = NodeInfo("n1", 4, cpus=8, memory_bytes=1 << 30, gpus=1, hostname="h")
    assert NodeInfo.from_json(info.to_json()) == info
    report = WorkerReport("n1.0", "n1", 3, "FAILED", restarts=2, exit_code=1, pid=42)
    assert WorkerReport.from_json(report.to_json()) == report
    rec = JobRecord(JOB, "j", "ps-async", state=RUNNING, generation=2)
    assert JobRecord.from_json(rec.to_json()).generation == 2


# -- choose_workers --------------------------------------------------------------


def test_choose_fills_up_to_max_in_node_order() -> None:
    chosen = choose_workers(nodes(b=2, a=2), {}, [], [], max_workers=3)
    assert chosen == ["a.0", "a.1", "b.0"]
    assert choose_workers(nodes(a=2, b=2), {}, [], [], max_workers=10) == [
        "a.0",
        "a.1",
        "b.0",
        "b.1",
    ]


def test_choose_keeps_current_members() -> None:
    # Without the current set this would pick a.0; with it, b.1 stays (no churn).
    assert choose_workers(nodes(a=2, b=2), {}, ["b.1"], [], max_workers=1) == ["b.1"]
    chosen = choose_workers(nodes(a=2, b=2), {}, ["b.1", "a.1"], [], max_workers=3)
    assert set(chosen) >= {"b.1", "a.1"}
    assert len(chosen) == 3
    assert chosen == sorted(chosen, key=split_worker_id)


def test_choose_keeps_current_before_filling_when_full() -> None:
    chosen = choose_workers(nodes(a=1, b=1, c=1), {}, ["c.0", "b.0"], [], max_workers=2)
    assert chosen == ["b.0", "c.0"]


def test_choose_skips_failed_workers() -> None:
    chosen = choose_workers(nodes(a=2, b=1), {}, ["a.0", "b.0"], ["a.0"], max_workers=3)
    assert "a.0" not in chosen
    assert chosen == ["a.1", "b.0"]


def test_choose_drops_members_of_gone_nodes() -> None:
    chosen = choose_workers(nodes(a=1), {}, ["a.0", "gone.0"], [], max_workers=2)
    assert chosen == ["a.0"]


def test_choose_drops_slots_a_node_no_longer_has() -> None:
    chosen = choose_workers(nodes(a=1), {}, ["a.0", "a.1"], [], max_workers=2)
    assert chosen == ["a.0"]


def test_choose_respects_slots_taken_by_other_jobs() -> None:
    assert choose_workers(nodes(a=2, b=2), {"a": 2}, [], [], max_workers=4) == ["b.0", "b.1"]
    assert choose_workers(nodes(a=2, b=2), {"a": 1, "b": 2}, [], [], max_workers=4) == ["a.0"]
    # The job's own members count against the node's free slots.
    assert choose_workers(nodes(a=2), {"a": 1}, ["a.1"], [], max_workers=2) == ["a.1"]


def test_choose_is_independent_of_input_order() -> None:
    cluster = nodes(a=3, b=2, c=1)
    current = ["c.0", "a.2"]
    reference = choose_workers(cluster, {"b": 1}, current, ["a.0"], max_workers=4)
    for perm in itertools.permutations(current):
        shuffled = dict(reversed(list(cluster.items())))
        assert choose_workers(shuffled, {"b": 1}, list(perm), ["a.0"], 4) == reference


# -- decide ------------------------------------------------------------------------


def make_spec(mode: str = "ps-async", wmin: int = 1, wmax: int = 2):
    return parse_spec(
        {
            "name": "job",
            "mode": mode,
            "task": "linreg.py",
            "steps": 10,
            "workers": {"min": wmin, "max": wmax},
        }
    )


def snapshot(
    members: list[str] | None,
    *,
    gen_number: int = 1,
    reports: Sequence[WorkerReport] = (),
    mode: str = "ps-async",
    wmin: int = 1,
    wmax: int = 2,
    state: str = RUNNING,
) -> JobSnapshot:
    gen = None if members is None else assign_ranks(JOB, gen_number, members)
    record = JobRecord(JOB, "job", mode, state=state, generation=gen_number if gen else 0)
    return JobSnapshot(
        spec=make_spec(mode, wmin, wmax),
        record=record,
        generation=gen,
        workers={r.worker_id: r for r in reports},
    )


def report(wid: str, state: str, generation: int = 1, **kw) -> WorkerReport:
    return WorkerReport(wid, split_worker_id(wid)[0], generation, state, **kw)


PS = {"ps-0": "127.0.0.1:1"}


def test_seal_when_a_members_node_vanished() -> None:
    job = snapshot(["a.0", "b.0"], reports=[report("a.0", "RUNNING"), report("b.0", "RUNNING")])
    action = decide(job, ClusterSnapshot(nodes(a=1), PS))
    assert isinstance(action, Seal)
    assert action.workers == ("a.0",)
    assert "lost=b.0" in action.reason


def test_seal_with_new_worker_when_node_joins() -> None:
    job = snapshot(["a.0"], reports=[report("a.0", "RUNNING")])
    action = decide(job, ClusterSnapshot(nodes(a=1, b=1), PS))
    assert isinstance(action, Seal)
    assert action.workers == ("a.0", "b.0")
    assert "joined=b.0" in action.reason


# -- which seals wait for the join window (invariant 9) -----------------------------


@pytest.mark.parametrize(
    ("current", "wanted", "wmin", "wmax", "restore", "now"),
    [
        # a departure, a stop, a restart of the same set: at once
        (["a.0", "b.0", "c.0"], ["a.0", "b.0"], 1, 4, False, ["a.0", "b.0"]),
        (["a.0", "b.0"], [], 1, 4, False, []),
        (["a.0", "b.0"], ["a.0", "b.0"], 1, 4, False, ["a.0", "b.0"]),
        # a join waits, unless the set is full or a restore is due anyway
        (["a.0"], ["a.0", "b.0"], 1, 4, False, None),
        ([], ["a.0", "b.0"], 1, 4, False, None),
        (["a.0"], ["a.0", "b.0"], 1, 2, False, ["a.0", "b.0"]),
        ([], ["a.0", "b.0"], 1, 2, False, ["a.0", "b.0"]),
        (["a.0"], ["a.0", "b.0"], 1, 4, True, ["a.0", "b.0"]),
        # lost and joined at once: the survivors now, the joins later ...
        (["a.0", "b.0"], ["a.0", "c.0"], 1, 4, False, ["a.0"]),
        # ... unless the survivors alone are too few to train
        (["a.0", "b.0"], ["a.0", "c.0"], 2, 4, False, None),
    ],
)
def test_departures_never_wait_for_the_join_window(
    current, wanted, wmin, wmax, restore, now
) -> None:
    spec = make_spec("allreduce", wmin, wmax)
    got = seal_at_once(Seal(tuple(wanted), "why", restore=restore), frozenset(current), spec)
    if now is None:
        assert got is None
    else:
        assert got is not None and list(got.workers) == now and got.restore == restore


@pytest.mark.parametrize("restore", [False, True])
def test_a_generation_nobody_runs_in_any_more_waits_for_the_window(restore) -> None:
    """After a whole-cluster restart: gather what comes back rather than seal the first."""
    spec = make_spec("ps-async", 1, 2)
    current = frozenset({"a.0", "b.0"})
    action = Seal(("b.0",), "why", restore=restore)
    assert seal_at_once(action, current, spec, running=frozenset()) is None
    assert seal_at_once(action, current, spec, running=frozenset({"b.0"})) == action
    # A first generation has nobody to wait for either way.
    assert seal_at_once(Seal(("a.0", "b.0"), "why"), frozenset(), spec, frozenset()) is not None


def test_running_members_are_members_heard_training_in_the_current_generation() -> None:
    gen = assign_ranks(JOB, 2, ["a.0", "b.0", "d.0"])
    heard = {"a.0": (2, 100.0), "b.0": (1, 100.0), "c.0": (2, 100.0), "d.0": (2, 50.0)}
    assert running_members(gen, heard, now=110.0) == {"a.0"}  # d.0: heard too long ago
    assert running_members(None, heard, now=110.0) == frozenset()


def test_no_seal_when_a_node_joins_at_max() -> None:
    job = snapshot(["a.0", "b.0"], wmax=2)
    assert decide(job, ClusterSnapshot(nodes(a=1, b=1, c=1), PS)) == Nothing()


def test_nothing_when_nothing_changed() -> None:
    job = snapshot(["a.0", "b.0"], reports=[report("a.0", "RUNNING"), report("b.0", "STARTING")])
    assert decide(job, ClusterSnapshot(nodes(a=1, b=1), PS)) == Nothing()


def test_first_generation_is_sealed() -> None:
    job = snapshot(None, state=WAITING)
    action = decide(job, ClusterSnapshot(nodes(a=1, b=1), PS))
    assert isinstance(action, Seal)
    assert action.workers == ("a.0", "b.0")


def test_wait_below_min_workers() -> None:
    job = snapshot(None, wmin=3, wmax=4, state=WAITING)
    action = decide(job, ClusterSnapshot(nodes(a=1, b=1), PS))
    assert isinstance(action, Wait)
    assert "2 of at least 3" in action.message


def test_running_generation_ends_when_it_falls_below_min() -> None:
    job = snapshot(["a.0", "b.0"], wmin=2, wmax=2)
    action = decide(job, ClusterSnapshot(nodes(a=1), PS))
    assert isinstance(action, Seal)
    assert action.workers == ()


def test_running_generation_ends_when_min_is_raised_past_its_workers() -> None:
    # `elasticd scale --min 3`: nobody left, but the job may not train on with two
    job = snapshot(["a.0", "b.0"], mode="allreduce", wmin=3, wmax=3)
    action = decide(job, ClusterSnapshot(nodes(a=1, b=1), PS))
    assert action == Seal((), "2 of at least 3 workers available")
    assert seal_at_once(action, job.generation.worker_ids, job.spec) == action  # no join window


def test_slots_of_other_jobs_are_not_used() -> None:
    job = snapshot(None, wmin=1, wmax=2, state=WAITING)
    cluster = ClusterSnapshot(nodes(a=1, b=1), PS, taken={"other": {"a": 1}, JOB: {"b": 1}})
    action = decide(job, cluster)
    # The job's own entry in `taken` does not count against it; the other job's does.
    assert isinstance(action, Seal)
    assert action.workers == ("b.0",)


def test_wait_without_ps_in_ps_async_mode() -> None:
    job = snapshot(None, state=WAITING)
    action = decide(job, ClusterSnapshot(nodes(a=1), {}))
    assert isinstance(action, Wait)
    assert "parameter server" in action.message
    # All-reduce needs no PS.
    job = snapshot(None, mode="allreduce", state=WAITING)
    assert decide(job, ClusterSnapshot(nodes(a=1), {})) == Seal(("a.0",), "lost=- joined=a.0")


def test_complete_when_all_members_succeeded() -> None:
    reports = [report("a.0", "SUCCEEDED", 2), report("b.0", "SUCCEEDED", 2)]
    job = snapshot(["a.0", "b.0"], gen_number=2, reports=reports)
    assert decide(job, ClusterSnapshot(nodes(a=1, b=1), PS)) == Complete()
    # Even when the nodes are already gone: the work is done.
    assert decide(job, ClusterSnapshot({}, {})) == Complete()


def test_not_complete_while_a_member_runs() -> None:
    reports = [report("a.0", "SUCCEEDED"), report("b.0", "RUNNING")]
    job = snapshot(["a.0", "b.0"], reports=reports)
    assert decide(job, ClusterSnapshot(nodes(a=1, b=1), PS)) == Nothing()


def test_success_in_an_older_generation_does_not_complete() -> None:
    reports = [report("a.0", "SUCCEEDED", 1), report("b.0", "SUCCEEDED", 1)]
    job = snapshot(["a.0", "b.0"], gen_number=2, reports=reports)
    assert decide(job, ClusterSnapshot(nodes(a=1, b=1), PS)) == Nothing()


def test_fail_when_a_member_reports_failed() -> None:
    reports = [report("a.0", "RUNNING"), report("b.0", FAILED, restarts=3, exit_code=2)]
    job = snapshot(["a.0", "b.0"], reports=reports)
    action = decide(job, ClusterSnapshot(nodes(a=1, b=1), PS))
    assert isinstance(action, Fail)
    assert "b.0" in action.message and "exit code 2" in action.message


def test_failed_worker_of_an_older_generation_is_replaced_not_fatal() -> None:
    # c.0 failed for good in generation 1 and is no longer a member: never re-chosen.
    reports = [report("a.0", "RUNNING", 2), report("c.0", FAILED, 1)]
    job = snapshot(["a.0"], gen_number=2, reports=reports, wmax=3)
    action = decide(job, ClusterSnapshot(nodes(a=1, b=1, c=1), PS))
    assert isinstance(action, Seal)
    assert action.workers == ("a.0", "b.0")


@pytest.mark.parametrize("state", [COMPLETED, FAILED, "CANCELLED"])
def test_terminal_jobs_do_nothing(state: str) -> None:
    job = snapshot(["a.0"], state=state)
    assert decide(job, ClusterSnapshot(nodes(b=4), PS)) == Nothing()


# -- a PS tier that lost part of the job ------------------------------------------------


def placed(job: JobSnapshot, checkpoint: str = "") -> JobSnapshot:
    """``job`` placed on ps-0 (boot id b0) and ps-1 (boot id b1), with ``checkpoint``."""
    placement = place(
        [TensorSpec("w", "float32", (64, 64)), TensorSpec("b", "float32", (64,))],
        ["ps-0", "ps-1"],
    ).with_incarnations({"ps-0": "b0", "ps-1": "b1"})
    record = job.record.evolve(checkpoint=checkpoint, checkpoint_step=40 if checkpoint else 0)
    return replace(job, placement=placement, record=record)


TWO_PS = {"ps-0": "127.0.0.1:1", "ps-1": "127.0.0.1:2"}


@pytest.mark.parametrize(
    ("ps", "incarnations", "why"),
    [
        ({"ps-0": TWO_PS["ps-0"]}, {"ps-0": "b0"}, "ps-1 is gone"),
        (TWO_PS, {"ps-0": "b0", "ps-1": "b1-again"}, "ps-1 restarted and lost"),
    ],
    ids=["gone", "restarted"],
)
def test_a_lost_ps_restores_the_job_from_its_checkpoint(ps, incarnations, why) -> None:
    running = snapshot(["a.0", "b.0"], reports=[report("a.0", "RUNNING"), report("b.0", "RUNNING")])
    cluster = ClusterSnapshot(nodes(a=1, b=1), ps, ps_incarnations=incarnations)
    action = decide(placed(running, checkpoint="file:///c/job-1/40"), cluster)
    assert action == Seal(("a.0", "b.0"), action.reason, restore=True)
    assert why in action.reason and "file:///c/job-1/40" in action.reason

    # Without a checkpoint the job stops and waits: nothing is trained on a fresh slice.
    action = decide(placed(running), cluster)
    assert action.workers == () and not action.restore
    assert why in action.reason and "no checkpoint to restore from" in action.reason


def test_an_intact_ps_tier_restores_nothing() -> None:
    running = snapshot(["a.0"], reports=[report("a.0", "RUNNING")])
    cluster = ClusterSnapshot(nodes(a=1), TWO_PS, ps_incarnations={"ps-0": "b0", "ps-1": "b1"})
    assert decide(placed(running, checkpoint="file:///c/job-1/40"), cluster) == Nothing()


def test_progress_from_before_a_restore_no_longer_counts() -> None:
    book = ProgressBook()
    book.record(JOB, "a.0", 1, 90, 0.5, False)  # trained past the checkpoint, then lost
    restored = JobRecord(JOB, "job", "ps-async", state=RUNNING, generation=2, step=40)
    restored = restored.evolve(restored_generation=2, restored_step=40)
    assert book.live(restored).step == 40
    book.record(JOB, "a.0", 2, 45, 0.4, False)
    assert book.live(restored).step == 45


def test_a_restore_that_began_is_finished_even_if_the_lost_ps_came_back() -> None:
    running = snapshot(["a.0"], reports=[report("a.0", "RUNNING")])
    job = placed(running, checkpoint="file:///c/job-1/40")
    cluster = ClusterSnapshot(nodes(a=1), TWO_PS, ps_incarnations={"ps-0": "b0", "ps-1": "b1"})
    assert decide(job, cluster) == Nothing()  # the PS tier is whole
    begun = replace(job, record=job.record.evolve(restore_pending=2, restored_generation=0))
    action = decide(begun, cluster)
    assert action == Seal(("a.0",), action.reason, restore=True)
    assert "a restore that did not finish" in action.reason
    done = replace(job, record=job.record.evolve(restore_pending=2, restored_generation=2))
    assert decide(done, cluster) == Nothing()


def test_a_starting_replacement_keeps_its_place_and_joins_once_ready() -> None:
    """allreduce: the group re-forms without a restarting process, no other slot takes
    its place while it starts, and it is let back in only once its agent says READY."""
    cluster = ClusterSnapshot(nodes(a=2, b=1), {})
    starting = [report("a.0", "RUNNING", 1), report("b.0", "RESTARTING", 1)]
    job = snapshot(["a.0", "b.0"], reports=starting, mode="allreduce")
    assert decide(job, cluster) == Seal(("a.0",), "lost=b.0 joined=-")
    # Sealed without it; still starting: nothing changes (a.1 does not take its place).
    job = snapshot(["a.0"], gen_number=2, reports=starting, mode="allreduce")
    assert decide(job, cluster) == Nothing()
    ready = [report("a.0", "RUNNING", 2), report("b.0", "READY", 1)]
    job = snapshot(["a.0"], gen_number=2, reports=ready, mode="allreduce")
    assert decide(job, cluster) == Seal(("a.0", "b.0"), "lost=- joined=b.0")


def test_seal_keeps_a_starting_replacement_in_its_nodes_assignment() -> None:
    cluster = ClusterSnapshot(nodes(a=1, b=1), {})
    reports = [report("a.0", "RUNNING", 1), report("b.0", "RESTARTING", 1)]
    job = snapshot(["a.0", "b.0"], reports=reports, mode="allreduce")
    gen = assign_ranks(JOB, 2, ["a.0"])
    keys = Keys("/t")
    ops = seal_ops(job, cluster, gen, None, job.record, keys, "ctl:1")
    by_key = {op.key: op for op in ops}
    on_b = json.loads(by_key[keys.assignment("b", JOB)].value)
    assert on_b["members"] == [] and on_b["standby"] == ["b.0"]
    assert json.loads(by_key[keys.assignment("a", JOB)].value)["standby"] == []


def test_below_min_the_allreduce_survivors_are_kept_running_outside_the_generation() -> None:
    cluster = ClusterSnapshot(nodes(a=1, b=1), {})
    reports = [report("a.0", "RUNNING", 1), report("b.0", "RESTARTING", 1)]
    job = snapshot(["a.0", "b.0"], reports=reports, mode="allreduce", wmin=2)
    keys = Keys("/t")
    ops = {
        op.key: op
        for op in seal_ops(job, cluster, assign_ranks(JOB, 2, []), None, job.record, keys, "c:1")
    }
    assert json.loads(ops[keys.assignment("a", JOB)].value)["standby"] == ["a.0"]
    assert json.loads(ops[keys.assignment("b", JOB)].value)["standby"] == ["b.0"]
    # ps-async workers are stopped: their state is on the PS tier.
    job = snapshot(["a.0", "b.0"], reports=reports, wmin=2)
    ops = {
        op.key: op
        for op in seal_ops(job, cluster, assign_ranks(JOB, 2, []), None, job.record, keys, "c:1")
    }
    assert isinstance(ops[keys.assignment("a", JOB)], Delete)


def test_a_member_ready_before_its_departure_was_sealed_gets_a_new_generation() -> None:
    """The replacement became READY before the controller saw its predecessor die: it
    waits for a generation newer than the one it was reported in, so one is sealed."""
    cluster = ClusterSnapshot(nodes(a=1, b=1), {})
    reports = [report("a.0", "RUNNING", 5), report("b.0", "READY", 5)]
    job = snapshot(["a.0", "b.0"], gen_number=5, reports=reports, mode="allreduce", wmin=2)
    action = decide(job, cluster)
    assert action == Seal(("a.0", "b.0"), "lost=- joined=- rejoined=b.0")
    assert seal_at_once(action, frozenset({"a.0", "b.0"}), job.spec) == action
