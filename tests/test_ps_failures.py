"""A parameter server that restarts, vanishes, or a job that shrinks: never silently wrong.

Whole local clusters of real processes. Each test causes the failure for real
(SIGKILL, SIGSTOP, a restart under the same id and port) and then checks what
the job reports and what the PS tier holds.
"""

from __future__ import annotations

import json
import re
import signal
import threading

from elasticd.client import JobClient
from elasticd.coord.etcd import EtcdClient
from elasticd.local import LocalCluster
from elasticd.ps_control import shard_infos
from elasticd.retry import wait_until
from tests.jobs import spec_yaml
from tests.test_local_cluster import processes_of_job
from tests.test_membership_etcd import generation

ENDLESS = 10_000_000


class KeyLog:
    """Every value one etcd key took from ``start_revision`` on, parsed, from etcd's own
    watch (nothing is missed)."""

    def __init__(self, c: LocalCluster, key: str, parse, start_revision: int) -> None:
        self.values: list = []
        self._lock = threading.Lock()
        self._client = EtcdClient(c.etcd)

        def on_events(events, _revision) -> None:
            with self._lock:
                self.values += [parse(e.value) for e in events if e.kind == "put"]

        self._cancel = self._client.watch_prefix(key, start_revision, on_events, print)

    def seen(self) -> list:
        with self._lock:
            return list(self.values)

    def close(self) -> None:
        self._cancel()
        self._client.close()


class StateLog(KeyLog):
    """Every state a job's status key took, from now on."""

    def __init__(self, c: LocalCluster, job_id: str) -> None:
        kv = c.client.get(c.keys.job_status(job_id))
        super().__init__(
            c, c.keys.job_status(job_id), lambda v: json.loads(v)["state"], kv.mod_revision + 1
        )
        with self._lock:
            self.values.insert(0, json.loads(kv.value)["state"])


def ps_address(c: LocalCluster, ps_id: str) -> str:
    return c.addresses()[ps_id]


def start(c: LocalCluster, **spec) -> tuple[JobClient, str]:
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    fields = {"steps": ENDLESS, "report_every_steps": 5, "max_restarts": 0, **spec}
    job_id = client.submit_yaml(spec_yaml(**fields))
    wait_until(lambda: client.get(job_id).step >= 20, 60, "training under way")
    return client, job_id


def test_a_ps_restarted_under_its_id_and_port_never_reinitializes_the_job(cluster):
    """The PS is SIGKILLed and started again at once, as systemd's Restart= would.

    The job must not go on with a fresh slice: it stops and WAITs with the reason.
    max_restarts is 0, so one worker crashing on the lost PS would fail the job.
    """
    c = cluster(ps=2, agents=2)
    client, job_id = start(c)
    states = StateLog(c, job_id)
    try:
        port = int(ps_address(c, "ps-1").rsplit(":", 1)[1])
        before = c.client.get(c.keys.ps("ps-1")).value
        c.kill("ps-1", signal.SIGKILL)
        c.start_ps("ps-1", port=port)
        # The old lease may expire before the new process registers: the key can be gone
        # for a while, and the job may wait first for a PS that is gone.
        wait_until(
            lambda: (kv := c.client.get(c.keys.ps("ps-1"))) is not None and kv.value != before,
            30,
            "ps-1 back",
        )
        restarted = "ps-1 restarted and lost this job's slices"
        wait_until(
            lambda: (s := client.get(job_id)).state == "WAITING" and restarted in s.message,
            60,
            "the job to wait for ps-1's lost slices",
        )
        gen = generation(c, job_id)
        assert gen.members == ()
        wait_until(lambda: not processes_of_job(job_id), 30, "the job's workers to stop")

        # The new ps-1 holds nothing of the job, and no worker made it create a fresh slice.
        info = shard_infos(job_id, {"ps-1": ps_address(c, "ps-1")})["ps-1"]
        assert not info.exists
        log = (c.base_dir / "logs" / "ps-1.log").read_text()
        after_restart = log.split(f"incarnation={info.incarnation}", 1)[1]
        assert "event=shard_created" not in after_restart
        # ps-0 still holds its slice, untouched and fenced at the waiting generation.
        kept = shard_infos(job_id, {"ps-0": ps_address(c, "ps-0")})["ps-0"]
        assert kept.exists and kept.generation == gen.number

        assert client.get(job_id).state == "WAITING"
        client.cancel(job_id)
        assert client.get(job_id).state == "CANCELLED"
        assert "COMPLETED" not in states.seen() and "FAILED" not in states.seen()
        assert states.seen()[-1] == "CANCELLED"
    finally:
        states.close()
        client.close()


def test_a_ps_unreachable_for_longer_than_its_lease_costs_no_restart(cluster):
    """SIGSTOP of a PS past its lease: the job waits for it, then completes when it comes back
    with its state. max_restarts is 0: no worker may crash meanwhile."""
    c = cluster(ps=2, agents=2)
    client, job_id = start(c, steps=400)
    try:
        c.kill("ps-0", signal.SIGSTOP)
        try:
            wait_until(lambda: "ps-0" not in c.registered("ps"), 30, "ps-0's lease to expire")
            status = wait_until(
                lambda: (s := client.get(job_id)).state == "WAITING" and s, 30, "the job to wait"
            )
            assert "ps-0 is gone" in status.message, status.message
        finally:
            c.kill("ps-0", signal.SIGCONT)
        wait_until(lambda: "ps-0" in c.registered("ps"), 30, "ps-0 to register again")
        final = client.wait(job_id, timeout=180, interval=0.2)
        assert final.state == "COMPLETED", final.message
        assert final.step == 400
    finally:
        client.close()


def test_cancel_with_a_dead_ps_drops_the_surviving_shards(cluster):
    c = cluster(ps=2, agents=1)
    client, job_id = start(c)
    try:
        survivor = {"ps-0": ps_address(c, "ps-0")}
        assert shard_infos(job_id, survivor)["ps-0"].exists
        c.kill("ps-1", signal.SIGKILL)  # still registered: its lease has not expired
        assert "ps-1" in c.registered("ps")
        status = client.cancel(job_id)
        assert status.state == "CANCELLED"
        assert not shard_infos(job_id, survivor)["ps-0"].exists
        kvs, _ = c.client.get_prefix(c.keys.all_assignments)
        assert [kv.key for kv in kvs if kv.key.endswith(job_id)] == []
        wait_until(lambda: not processes_of_job(job_id), 30, "the job's workers to stop")
        assert client.get(job_id).state == "CANCELLED"
    finally:
        client.close()


def test_a_synchronous_job_goes_on_at_the_new_size_when_a_worker_dies(cluster):
    c = cluster(ps=2, agents=2)
    client, job_id = start(c, steps=300, ps={"max_staleness": 0})
    try:
        assert len(generation(c, job_id).members) == 2
        c.kill("node-1", signal.SIGKILL)  # the agent, and its worker with it
        gen = wait_until(
            lambda: (g := generation(c, job_id)) and g.nodes == ["node-0"] and g, 30, "a new gen"
        )
        step = client.get(job_id).step
        wait_until(lambda: client.get(job_id).step >= step + 30, 60, "rounds of one worker")
        final = client.wait(job_id, timeout=120, interval=0.2)
        assert (final.state, final.step) == ("COMPLETED", 300)
        for ps in ("ps-0", "ps-1"):
            log = (c.base_dir / "logs" / f"{ps}.log").read_text()
            sizes = re.findall(
                rf"round_size_changed job={job_id} generation=(\d+) from=2 to=1", log
            )
            assert sizes and int(sizes[-1]) >= gen.number, f"{ps}: rounds not resized: {sizes}"
    finally:
        client.close()
