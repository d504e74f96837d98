"""Three machines for real: network namespaces on a bridge, and a partition by a pulled cable.

Host A runs etcd, the controller and a parameter server; hosts B and C run an
agent each (tests/fixtures/netns.py). Every daemon listens on 0.0.0.0 and is
told only etcd's address: what it registers is the address of its interface
on the route to etcd, and the others find it there. A ps-async job and an
allreduce job train at once, each with one worker on B and one on C (gloo
forms its group across the two machines).

Then C's cable is pulled: C's workers leave the next generation of both jobs
(C's agent does not answer and its lease expires), and B trains on alone.
Plugged back in, C's agent registers again and its workers come back in a later
generation. Both jobs complete, and the batch counter task (one parameter slot
per batch, see tests/tasks/batch_counter.py) shows every batch applied exactly
once: none lost with C's workers, none applied twice by a push or a step that
crossed the partition.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from elasticd.checkpoint import CheckpointStore
from elasticd.checkpoint.locate import load_state
from elasticd.client import JobClient
from elasticd.coord.election import observe_leader
from elasticd.coord.etcd import EtcdClient, EtcdError
from elasticd.coord.keys import Keys
from elasticd.local_etcd import EtcdServer
from elasticd.retry import wait_until
from tests.fixtures.cluster import LEASE_TTL_S
from tests.fixtures.netns import Host, Network
from tests.jobs import spec_yaml

TASK = Path(__file__).resolve().parent / "tasks" / "batch_counter.py"
ETCD_PORT = 2379  # inside host A: the namespace is A's own, every port is free
CONTROLLER_PORT = 7000
PS_BATCHES = 600  # the ps-async job: one epoch of this many batches
ALLREDUCE_STEPS = 200  # a step consumes one batch per worker
BOTH = ["b.0", "c.0"]


def elasticd(*args: str) -> list[str]:
    return [sys.executable, "-m", "elasticd", *args]


def start_cluster(network: Network, base: Path) -> tuple[Host, Host, Host]:
    a, b, c = (network.add_host(name) for name in "abc")
    logs = base / "logs"
    etcd = EtcdServer(
        base / "etcd",
        host=a.address,
        client_port=ETCD_PORT,
        peer_port=ETCD_PORT + 1,
        runner=a.runner,
    )
    network.own(etcd.start(wait=False).proc)
    common = ["--etcd", f"{a.address}:{ETCD_PORT}", "--lease-ttl", str(LEASE_TTL_S),
              "--host", "0.0.0.0", "--insecure"]  # fmt: skip
    a.start(
        "controller",
        elasticd("controller", *common, "--port", str(CONTROLLER_PORT), "--join-window", "0.5",
                 "--checkpoint-url", str(base / "checkpoints")),
        logs / "controller.log",
    )  # fmt: skip
    a.start("ps-0", elasticd("ps", *common, "--id", "ps-0"), logs / "ps-0.log")
    for host in (b, c):
        host.start(
            f"agent-{host.name}",
            elasticd("agent", *common, "--node-id", host.name, "--slots", "2",
                     "--log-dir", str(logs)),
            logs / f"agent-{host.name}.log",
            env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    return a, b, c


def registrations(etcd: EtcdClient, prefix: str) -> dict[str, dict]:
    try:
        kvs, _ = etcd.get_prefix(prefix)
    except EtcdError:
        return {}  # etcd still starting
    return {kv.key[len(prefix) :]: json.loads(kv.value) for kv in kvs}


def workers(client: JobClient, job_id: str) -> list[str]:
    return sorted(w.worker_id for w in client.get(job_id).workers)


def counts(base: Path, job_id: str) -> list[float]:
    """How often each batch was applied, from the job's final checkpoint (slot ``a``)."""
    store = CheckpointStore(str(base / "checkpoints"))
    params, _ = load_state(store, store.latest(job_id))
    return (-params["a"]).tolist()


def check_advertised(etcd: EtcdClient, a: Host, b: Host, c: Host) -> None:
    """Each daemon registered the address of its own interface, never 0.0.0.0 or a hostname."""
    keys = Keys("/elasticd")
    nodes = wait_until(
        lambda: len(n := registrations(etcd, keys.nodes)) == 2 and n, 60, "agents on B and C"
    )
    ps = wait_until(lambda: registrations(etcd, keys.ps_servers), 60, "the PS on A")
    leader = wait_until(lambda: observe_leader(etcd, keys.election), 60, "the controller on A")
    assert {n: (r["address"], r["agent_address"].rsplit(":", 1)[0]) for n, r in nodes.items()} == {
        "b": (b.address, b.address),
        "c": (c.address, c.address),
    }
    assert ps["ps-0"]["address"].startswith(f"{a.address}:"), ps
    assert leader.decode() == f"{a.address}:{CONTROLLER_PORT}"


def submit_across_b_and_c(client: JobClient, slow: Path) -> tuple[str, str]:
    """A ps-async and an allreduce job, each with a worker on B and one on C.

    Nodes fill in order: the ps-async job starts on B alone, the allreduce job then
    takes a slot on B and one on C, and the ps-async job, raised to 2, C's other slot.
    """
    common = {"task": str(TASK), "optimizer": {"name": "sgd", "lr": 1.0},
              "report_every_steps": 5, "max_restarts": 5}  # fmt: skip
    ps_job = client.submit_yaml(spec_yaml(
        **common,
        steps=PS_BATCHES,
        workers={"min": 1, "max": 1},
        task_args={"batches": PS_BATCHES, "step_delay_s": 0.002, "slow": str(slow)},
        data={"shard_batches": 16, "epoch_batches": PS_BATCHES},
        ps={"max_staleness": 2},
    ))  # fmt: skip
    wait_until(lambda: workers(client, ps_job) == ["b.0"], 60, "the ps-async job on B")
    # lr 1 at 2 workers (scaled to 0.5 at 1): every batch applied takes 0.5 off its slot.
    ar_job = client.submit_yaml(spec_yaml(
        **common,
        mode="allreduce",
        steps=ALLREDUCE_STEPS,
        workers={"min": 1, "max": 2},
        task_args={"batches": 2 * ALLREDUCE_STEPS, "step_delay_s": 0.002, "slow": str(slow)},
        allreduce={"collective_timeout_s": 5},
    ))  # fmt: skip
    wait_until(lambda: workers(client, ar_job) == BOTH, 60, "the allreduce job on B and C")
    client.scale(ps_job, 1, 2)
    wait_until(lambda: workers(client, ps_job) == BOTH, 60, "the ps-async job on B and C")
    return ps_job, ar_job


def partition(network: Network, c: Host, client: JobClient, jobs: tuple[str, ...]) -> None:
    """Cut C off: its workers leave, B trains on; plug it back: they return."""
    before = {job: client.get(job).generation for job in jobs}
    network.cut(c)
    for job in jobs:
        alone = wait_until(
            lambda j=job: (
                (s := client.get(j)).generation > before[j]
                and [w.worker_id for w in s.workers] == ["b.0"]
                and s
            ),
            60,
            f"{job} to go on without C",
        )
        wait_until(lambda j=job, s=alone: client.get(j).step >= s.step + 5, 60, f"{job} on B")
    cut = {job: client.get(job).generation for job in jobs}
    network.heal(c)
    for job in jobs:
        wait_until(
            lambda j=job: (
                (s := client.get(j)).generation > cut[j]
                and sorted(w.worker_id for w in s.workers) == BOTH
                and all(w.state == "RUNNING" for w in s.workers)
            ),
            60,
            f"C's worker back in {job}",
        )


@pytest.mark.early
def test_jobs_train_across_hosts_and_come_back_after_a_partition(network, tmp_path):
    a, b, c = start_cluster(network, tmp_path)
    etcd = EtcdClient(a.tunnel(ETCD_PORT))
    client = JobClient(controller=a.tunnel(CONTROLLER_PORT))
    slow = tmp_path / "slow"  # while it exists, every batch takes 0.1 s
    slow.touch()
    try:
        check_advertised(etcd, a, b, c)
        jobs = ps_job, ar_job = submit_across_b_and_c(client, slow)
        # Both train across the two machines: C's workers report steps of their own.
        for job in jobs:
            wait_until(
                lambda j=job: all(w.step >= 5 for w in client.get(j).workers), 60, f"{job} training"
            )
        partition(network, c, client, jobs)
        slow.unlink()
        final = {job: client.wait(job, timeout=120, interval=0.5) for job in jobs}
    finally:
        client.close()
        etcd.close()

    assert final[ps_job].state == "COMPLETED" and final[ps_job].step == PS_BATCHES, final[ps_job]
    applied = counts(tmp_path, ps_job)
    assert applied == [1.0] * PS_BATCHES, (
        f"batches lost {[i for i, n in enumerate(applied) if n == 0]}, "
        f"applied twice {[i for i, n in enumerate(applied) if n > 1]}"
    )
    ar = final[ar_job]
    assert ar.state == "COMPLETED" and ar.step == ALLREDUCE_STEPS, ar
    # Steps consume batches 0, 1, 2, ... in order, one per worker: a prefix applied once each.
    applied = [n * 2 for n in counts(tmp_path, ar_job)]
    used = applied.count(1.0)
    assert ALLREDUCE_STEPS < used < 2 * ALLREDUCE_STEPS, used  # some steps ran on B alone
    assert applied == [1.0] * used + [0.0] * (2 * ALLREDUCE_STEPS - used), applied
