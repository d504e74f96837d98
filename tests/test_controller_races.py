"""The controller against itself: racing cancels, stale decisions, deposed leaders, etcd faults.

The controller runs in the test process (so the races can be driven hard),
on a real etcd, with a real session and election. Nodes register as agents
do, with keys on a lease; no agent process is needed, since these tests
check what the controller writes, not what trains.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import replace

import pytest

from elasticd.coord.election import NotLeading
from elasticd.coord.etcd import EtcdClient, EtcdUnavailable
from elasticd.coord.keys import Keys
from elasticd.jobspec import load_spec_yaml
from elasticd.membership import Generation, NodeInfo
from elasticd.retry import wait_until
from elasticd.server.controller.controller import Controller
from elasticd.server.controller.errors import Conflict
from elasticd.server.controller.planning import Seal
from elasticd.server.controller.sealing import seal
from tests.fixtures.controller import start_controller
from tests.jobs import spec_yaml

pytestmark = pytest.mark.slow  # whole clusters or many processes: run first (conftest)


def allreduce_spec(**fields):
    return load_spec_yaml(
        spec_yaml(mode="allreduce", steps=1_000_000, workers={"min": 1, "max": 2}, **fields)
    )


def generation_of(client: EtcdClient, keys: Keys, job_id: str) -> Generation | None:
    kv = client.get(keys.generation(job_id))
    return Generation.from_json(kv.value) if kv else None


def test_cancel_racing_seals_never_lets_a_cancelled_job_run_again(etcd, keys, running, nodes):
    """50 jobs, each cancelled at a random moment while nodes come and go and seals run.

    etcd's own history (a watch from before the first submit) must show, for
    every job, nothing written to its status, generation or assignments after
    the write that cancelled it.
    """
    r = start_controller(etcd.endpoint, keys, "c0")
    running.append(r)
    client = r.client
    lease = nodes(2).lease_id
    wait_until(lambda: r.controller.is_leader, 30, "leadership")
    events: list = []
    lock = threading.Lock()
    start_rev = client.get_prefix(keys.prefix + "/")[1]

    def record(evs, _rev) -> None:
        with lock:
            events.extend(evs)

    cancel_watch = client.watch_prefix(keys.prefix + "/", start_rev + 1, record, print)
    flapping = threading.Event()

    def flap() -> None:  # node-1 leaves and joins again and again: seals keep coming
        rng = random.Random(7)
        while not flapping.is_set():
            client.delete(keys.node("node-1"))
            flapping.wait(rng.uniform(0.0, 0.03))
            info = NodeInfo("node-1", slots=1, cpus=1, address="127.0.0.1")
            client.put(keys.node("node-1"), info.to_json(), lease=lease)
            flapping.wait(rng.uniform(0.0, 0.03))

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    rng = random.Random(1)
    jobs = []
    try:
        for _ in range(50):
            job_id = r.controller.submit(allreduce_spec())
            jobs.append(job_id)
            threading.Event().wait(rng.uniform(0.0, 0.15))  # cancel at a random moment
            assert r.controller.cancel(job_id).state == "CANCELLED"
    finally:
        flapping.set()
        flapper.join()
    # Let any seal still in flight land (or fail) before reading the history.
    for job_id in jobs:
        r.controller.lanes.run(job_id, lambda: None)
    r.controller.reconcile(wait=True)
    cancel_watch()

    sealed = 0
    with lock:
        history = list(events)
    for job_id in jobs:
        mine = [e for e in history if f"/{job_id}/" in e.key or e.key.endswith(f"/{job_id}")]
        cancelled_at = next(
            e.mod_revision
            for e in mine
            if e.key == keys.job_status(job_id)
            and e.kind == "put"
            and json.loads(e.value)["state"] == "CANCELLED"
        )
        after = [(e.kind, e.key) for e in mine if e.mod_revision > cancelled_at]
        assert after == [], f"{job_id} was written after its cancel: {after}"
        sealed += any(e.key == keys.generation(job_id) for e in mine)
        kvs, _ = client.get_prefix(keys.all_assignments)
        assert not [kv.key for kv in kvs if kv.key.endswith(f"/{job_id}")]
    # The race was real: many jobs had been sealed (some more than once) before their cancel.
    assert sealed >= 10, f"only {sealed} of 50 jobs were sealed before their cancel"


def test_a_seal_decided_before_a_cancel_changes_nothing(etcd, keys, running, nodes):
    """The backstop under the lanes: a stale decision's transaction fails as a whole."""
    r = start_controller(etcd.endpoint, keys, "c0")
    running.append(r)
    nodes(1)
    wait_until(lambda: r.controller.is_leader, 30, "leadership")
    job_id = r.controller.submit(allreduce_spec())
    wait_until(lambda: generation_of(r.client, keys, job_id), 30, "the first seal")
    stale = r.controller.snapshot(job_id)
    r.controller.cancel(job_id)
    before = r.client.get_prefix(keys.prefix + "/")[0]
    with pytest.raises(Conflict):
        seal(r.controller, stale, r.controller.view.cluster(), Seal(("node-0.0",), "stale"))
    after = r.client.get_prefix(keys.prefix + "/")[0]
    assert [(kv.key, kv.mod_revision) for kv in after] == [
        (kv.key, kv.mod_revision) for kv in before
    ]
    assert r.controller.snapshot(job_id).record.state == "CANCELLED"


def test_a_deposed_leader_cannot_write(etcd, keys, running, nodes):
    a = start_controller(etcd.endpoint, keys, "a")
    running.append(a)
    nodes(1)
    wait_until(lambda: a.controller.is_leader, 30, "a to lead")
    b = start_controller(etcd.endpoint, keys, "b")
    running.append(b)
    job_id = a.controller.submit(allreduce_spec())
    wait_until(lambda: generation_of(a.client, keys, job_id), 30, "the first seal")

    # a's loop stops (as if wedged); its lease is revoked (as if expired); b takes over.
    a.stop.set()
    a.thread.join(timeout=10)
    a.client.revoke_lease(a.session.lease_id)
    wait_until(lambda: b.controller.is_leader, 30, "b to lead")
    assert a.controller.is_leader  # a still believes it leads...
    snap = a.controller.snapshot(job_id)
    before = a.client.get(keys.job_status(job_id)).mod_revision
    with pytest.raises(NotLeading):  # ...but etcd refuses its writes
        a.controller._finish(snap, replace(snap.record, state="FAILED", message="deposed"))
    assert a.client.get(keys.job_status(job_id)).mod_revision == before
    assert b.controller.cancel(job_id).state == "CANCELLED"


class FlakyEtcd(EtcdClient):
    """A real etcd client whose calls fail on a seeded schedule, as a flaky network would.

    ``mode`` "flaky": about one call in four raises (an etcd error or, once in a
    while, an unexpected exception); "down": every call raises.
    """

    def __init__(self, endpoint: str, seed: int) -> None:
        super().__init__(endpoint)
        self.rng = random.Random(seed)
        self.mode = "ok"
        self.injected = 0

    def _call(self, fn, *args, **kwargs):
        if self.mode == "down" or (self.mode == "flaky" and self.rng.random() < 0.25):
            self.injected += 1
            if self.mode == "flaky" and self.rng.random() < 0.2:
                raise RuntimeError("injected: not an etcd error")
            raise EtcdUnavailable("injected: etcd did not answer")
        return super()._call(fn, *args, **kwargs)


def test_the_leader_loop_survives_etcd_errors_and_hands_over(
    etcd, keys, running, etcd_client, nodes
):
    flaky = FlakyEtcd(etcd.endpoint, seed=3)
    a = start_controller(etcd.endpoint, keys, "a", client=flaky)
    running.append(a)
    nodes(2)
    wait_until(lambda: a.controller.is_leader, 30, "a to lead")

    flaky.mode = "flaky"
    passes = a.controller.reconciles
    first = wait_until(lambda: _submit(a.controller), 30, "a submit through the faults")
    wait_until(lambda: generation_of(etcd_client, keys, first), 60, "a seal")
    # faults come at about one a second (one call in four fails, at the loop's pace)
    wait_until(
        lambda: a.controller.reconciles > passes + 10 and flaky.injected > 8,
        60,
        "reconcile passes to go on through injected faults",
    )
    assert a.thread.is_alive()

    # etcd goes away for a for good: its lease expires, b leads and reconciles.
    b = start_controller(etcd.endpoint, keys, "b")
    running.append(b)
    flaky.mode = "down"
    wait_until(lambda: b.controller.is_leader, 30, "b to take over")
    assert b.controller.cancel(first).state == "CANCELLED"  # frees both nodes
    second = b.controller.submit(allreduce_spec())
    wait_until(lambda: generation_of(b.client, keys, second), 30, "b to seal a job")
    assert a.thread.is_alive()  # still standing by, not dead
    flaky.mode = "ok"
    wait_until(lambda: not a.controller.is_leader, 30, "a to stand by")


def _submit(controller: Controller) -> str | None:
    try:
        return controller.submit(allreduce_spec())
    except Exception:
        return None


def test_the_only_controller_leads_again_after_its_lease_expired(etcd, keys, running, nodes):
    # As after a SIGSTOP longer than the TTL: the lease is gone with the candidate's key.
    a = start_controller(etcd.endpoint, keys, "a")
    running.append(a)
    nodes(1)
    wait_until(lambda: a.controller.is_leader, 30, "a to lead")
    lost = a.session.lease_id
    a.client.revoke_lease(lost)
    wait_until(lambda: a.session.lease_id != lost, 30, "a new lease")
    # Its session puts its key again under the new lease; that key is still its own.
    wait_until(lambda: a.election.is_leader(), 30, "a to lead again")
    candidates = a.election.candidates()
    assert list(candidates) == [a.election.my_key], candidates
    job_id = a.controller.submit(allreduce_spec())
    wait_until(lambda: generation_of(a.client, keys, job_id), 30, "a seal by the leader")
