"""Membership, leader election and etcd faults, with real etcd processes.

Each test causes the failure for real (SIGKILL, SIGSTOP, a killed etcd
member) and then checks the invariant: the generation reflects who is alive,
training went on, nothing was applied twice.
"""

from __future__ import annotations

import signal
import time
import urllib.request

import pytest
import torch

from elasticd.checkpoint import CheckpointStore
from elasticd.client import JobClient
from elasticd.coord.cache import PrefixCache
from elasticd.coord.etcd import Compacted, EtcdClient, EtcdUnavailable
from elasticd.local import EtcdServer, LocalCluster
from elasticd.membership import Generation
from elasticd.placement import ShardPlacement
from elasticd.ps_client import PSTier
from elasticd.ps_errors import Fenced
from elasticd.retry import wait_until
from tests.jobs import spec_yaml
from tests.test_local_cluster import processes_of_job

pytestmark = pytest.mark.slow  # clusters through etcd outages: run first (conftest)

ENDLESS = 10_000_000  # steps: the job trains until the test is done with it


def generation(c: LocalCluster, job_id: str) -> Generation | None:
    kv = c.client.get(c.keys.generation(job_id))
    return Generation.from_json(kv.value) if kv else None


def nodes_of(gen: Generation | None) -> list[str]:
    return [] if gen is None else gen.nodes


def etcd_read(fn):
    """fn() or None while the client fails over from a dead endpoint."""
    try:
        return fn()
    except EtcdUnavailable:
        return None


def param_shapes(placement: ShardPlacement) -> dict[str, tuple[int, ...]]:
    """Whole parameter shapes, put back together from their slices."""
    shapes: dict[str, tuple[int, ...]] = {}
    for s in placement.slices:
        if s.whole:
            shapes[s.param] = s.shape
        else:
            rows = max(s.row_end, shapes.get(s.param, (0,))[0])
            shapes[s.param] = (rows, *s.shape[1:])
    return shapes


def running_job(c: LocalCluster, **spec) -> tuple[JobClient, str]:
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(**{"steps": ENDLESS, "report_every_steps": 5, **spec}))
    wait_until(lambda: client.get(job_id).step >= 10, 60, "training under way")
    return client, job_id


def test_new_agent_is_included_in_the_next_generation(cluster):
    c = cluster(ps=1, agents=1)
    client, job_id = running_job(c)
    assert nodes_of(generation(c, job_id)) == ["node-0"]
    c.start_agent("node-1")
    gen = wait_until(
        lambda: (g := generation(c, job_id)) and len(g.members) == 2 and g, 30, "node-1 to join"
    )
    assert [(m.worker_id, m.rank) for m in gen.members] == [("node-0.0", 0), ("node-1.0", 1)]
    wait_until(lambda: len(processes_of_job(job_id)) == 2, 30, "node-1's worker to start")
    step = client.get(job_id).step
    wait_until(lambda: client.get(job_id).step > step + 20, 30, "training to go on")
    client.close()


def test_job_below_min_workers_waits_then_runs(cluster):
    c = cluster(ps=1, agents=1)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=50, workers={"min": 2, "max": 2}))
    status = wait_until(lambda: (s := client.get(job_id)).state == "WAITING" and s, 30, "WAITING")
    assert "1 of at least 2" in status.message
    assert generation(c, job_id) is None
    c.start_agent("node-1")
    assert client.wait(job_id, timeout=60, interval=0.2).state == "COMPLETED"
    client.close()


def test_extra_nodes_above_max_stay_idle(cluster):
    c = cluster(ps=1, agents=3)
    client, job_id = running_job(c, workers={"min": 1, "max": 2})
    assert len(generation(c, job_id).members) == 2
    assert len(processes_of_job(job_id)) == 2
    client.close()


def test_sigkilled_agent_leaves_the_generation_and_a_stale_push_is_fenced(cluster):
    c = cluster(ps=2, agents=2)
    client, job_id = running_job(c)
    assert generation(c, job_id).number == 1
    c.kill("node-1", signal.SIGKILL)
    gen = wait_until(
        lambda: (g := generation(c, job_id)) and g.number >= 2 and g,
        30,
        "a generation without node-1",
    )
    assert nodes_of(gen) == ["node-0"]

    # A process left over from generation 1 cannot change generation 2's parameters.
    placement = ShardPlacement.from_json(c.client.get(c.keys.placement(job_id)).value)
    addresses = {k: v for k, v in c.addresses().items() if k.startswith("ps-")}
    stale = PSTier(job_id, 1, placement, addresses, worker_id="ghost")
    current = PSTier(job_id, gen.number, placement, addresses)
    try:
        full = {name: torch.zeros(shape) for name, shape in param_shapes(placement).items()}
        with pytest.raises(Fenced):
            stale.pull_into(full)
        with pytest.raises(Fenced):
            stale.push(full, {p: 0 for p in placement.ps_ids})
        assert all(i.generation == gen.number for i in current.info().values())
    finally:
        stale.close()
        current.close()
    client.close()


def test_sigstopped_agent_whose_lease_expired_rejoins_as_new(cluster):
    c = cluster(ps=1, agents=2)
    client, job_id = running_job(c)
    c.kill("node-1", signal.SIGSTOP)
    wait_until(lambda: "node-1" not in c.registered("nodes"), 30, "node-1's lease to expire")
    gen = wait_until(
        lambda: (g := generation(c, job_id)) and g.number >= 2 and g, 30, "a generation without it"
    )
    assert nodes_of(gen) == ["node-0"]
    c.kill("node-1", signal.SIGCONT)
    wait_until(lambda: "node-1" in c.registered("nodes"), 30, "node-1 to register again")
    gen = wait_until(
        lambda: (g := generation(c, job_id)) and g.number >= 3 and g, 30, "node-1 back in"
    )
    assert nodes_of(gen) == ["node-0", "node-1"]
    step = client.get(job_id).step
    wait_until(lambda: client.get(job_id).step > step + 20, 30, "training to go on")
    client.close()


def test_standby_controller_takes_over_and_the_job_finishes(cluster):
    c = cluster(ps=2, agents=2, controllers=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=2500, report_every_steps=5))
    wait_until(lambda: client.get(job_id).step >= 50, 60, "training under way")
    leader = c.leader()
    victim = next(
        name
        for name, p in c.procs.items()
        if name.startswith("controller") and leader.split(":")[1] in p.log_path.read_text()
    )
    pids_before = sorted(p.pid for p in processes_of_job(job_id))
    c.kill(victim, signal.SIGKILL)
    wait_until(lambda: (lead := c.leader()) and lead != leader, 30, "the standby to lead")
    # The new leader reloaded the job from etcd and the workers report to it.
    status = client.wait(job_id, timeout=180, interval=0.5)
    assert status.state == "COMPLETED", status
    assert status.step == 2500
    assert sorted(p.pid for p in processes_of_job(job_id)) in ([], pids_before)
    latest = CheckpointStore(str(c.base_dir / "checkpoints")).latest(job_id)
    assert set(latest.extra["versions"].values()) == {2500}
    assert status.generation == 1  # nobody left: the hand-over changed no membership
    client.close()


def test_etcd_down_for_ten_seconds_does_not_stop_training(cluster):
    c = cluster(ps=1, agents=2, own_etcd=True)
    client, job_id = running_job(c)
    direct = JobClient(controller=c.leader())  # etcd will not be there to find it
    pids = sorted(p.pid for p in processes_of_job(job_id))
    c.etcd_server.stop(signal.SIGKILL)
    step = direct.get(job_id).step
    outage_end = time.monotonic() + 10  # the outage itself is the scenario
    wait_until(lambda: direct.get(job_id).step > step + 50, 10, "training during the outage")
    time.sleep(max(outage_end - time.monotonic(), 0))
    assert sorted(p.pid for p in processes_of_job(job_id)) == pids  # nobody was killed
    c.etcd_server.start()

    wait_until(lambda: c.registered("nodes") == {"node-0", "node-1"}, 30, "agents registered")
    wait_until(lambda: c.leader() is not None, 30, "a leader")
    # Same leases, same generation: the blink changed no membership.
    assert generation(c, job_id).number == 1
    step = client.get(job_id).step
    wait_until(lambda: client.get(job_id).step > step + 20, 30, "training after the outage")
    assert sorted(p.pid for p in processes_of_job(job_id)) == pids
    direct.close()
    client.close()


def test_one_member_of_a_three_member_etcd_cluster_dies_unnoticed(cluster, tmp_path):
    members = [EtcdServer(tmp_path / f"m{i}" / "data", name=f"m{i}") for i in range(3)]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for m in members:
        m.initial_cluster = initial
        m.start(wait=False)
    try:
        for m in members:
            m.wait_ready()
        endpoints = ",".join(m.endpoint for m in members)
        c = LocalCluster(
            tmp_path / "cluster", etcd=endpoints, prefix="/three", lease_ttl=3, join_window=0.5
        )
        try:
            c.start(ps=1, agents=2)
            client, job_id = running_job(c)
            members[0].stop(signal.SIGKILL)
            step = client.get(job_id).step
            wait_until(lambda: client.get(job_id).step > step + 50, 30, "training to go on")
            # Give leases a full TTL to expire if keepalives were lost.
            deadline = time.monotonic() + 2 * c.lease_ttl
            while time.monotonic() < deadline:
                # The test's own client may still be pointed at the dead member:
                # like any caller, it retries and fails over to another one.
                nodes, gen = wait_until(
                    lambda: etcd_read(lambda: (c.registered("nodes"), generation(c, job_id))),
                    10,
                    "a live etcd member to answer",
                )
                assert nodes == {"node-0", "node-1"}
                assert gen.number == 1
                time.sleep(0.5)
            client.close()
        finally:
            c.stop()
    finally:
        for m in members:
            m.stop()


def test_steady_state_training_writes_nothing_to_etcd(cluster):
    c = cluster(ps=2, agents=2, own_etcd=True)
    client, job_id = running_job(c)
    wait_until(lambda: generation(c, job_id) and client.get(job_id).step >= 30, 30, "steady state")

    def writes() -> int:
        text = urllib.request.urlopen(c.etcd_server.metrics_url, timeout=5).read().decode()
        total = 0
        for line in text.splitlines():
            for metric in ("etcd_mvcc_put_total", "etcd_mvcc_delete_total", "etcd_mvcc_txn_total"):
                if line.startswith(metric + " "):
                    total += int(float(line.split()[1]))
        return total

    before_writes, before_step = writes(), client.get(job_id).step
    wait_until(lambda: client.get(job_id).step >= before_step + 200, 60, "200 more steps")
    after_writes = writes()
    assert after_writes - before_writes == 0, "training steps wrote to etcd"
    client.close()


def test_watch_from_a_compacted_revision_is_refused_and_the_cache_relists(etcd, prefix):
    client = EtcdClient(etcd.endpoint)
    try:
        client.put(f"{prefix}/a", b"1")
        old = client.get(f"{prefix}/a").mod_revision
        client.put(f"{prefix}/a", b"2")
        client.put(f"{prefix}/b", b"3")
        _, now = client.get_prefix(prefix)
        client._client.compact(now)  # etcd's own compaction

        errors = []
        cancel = client.watch_prefix(prefix, old, lambda *_: None, errors.append)
        wait_until(lambda: errors, 10, "the watch to be refused")
        cancel()
        assert isinstance(errors[0], Compacted)

        # A cache always lists first, then watches from the listed revision.
        cache = PrefixCache(client, prefix + "/").start()
        try:
            assert cache.wait_synced()
            assert cache.items() == {"a": b"2", "b": b"3"}
            client.put(f"{prefix}/c", b"4")
            wait_until(lambda: cache.items().get("c") == b"4", 10, "the watch to deliver c")
        finally:
            cache.stop()
    finally:
        client.delete_prefix(prefix + "/")
        client.close()


def test_cache_relists_after_etcd_restarts(tmp_path):
    server = EtcdServer(tmp_path / "etcd" / "data").start()
    client = EtcdClient(server.endpoint)
    cache = PrefixCache(client, "/r/").start()
    try:
        client.put("/r/a", b"1")
        wait_until(lambda: cache.items() == {"a": b"1"}, 10, "the first put")
        server.stop(signal.SIGKILL)
        server.start()

        def write_after_restart() -> bool:
            # A caller retries while the client still backs off the restarted endpoint.
            try:
                client.put("/r/b", b"2")
                client.delete("/r/a")
                return True
            except EtcdUnavailable:
                return False

        wait_until(write_after_restart, 30, "etcd to take writes again")
        # Whether the broken watch was noticed before or after the writes, the
        # cache must reflect what etcd holds now.
        wait_until(lambda: cache.items() == {"b": b"2"}, 30, "changes made after the restart")
    finally:
        cache.stop()
        client.close()
        server.stop()
