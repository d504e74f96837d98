"""Graceful drain: SIGTERM to an agent takes its workers out of the job at a step boundary.

The decisions first, as plain functions: what a draining agent does next, that
no job chooses a worker on a draining node (a departure, sealed at once), and
which node ``elasticd agent --drain`` means.


A real local cluster (etcd, controller, two PS, two agents) trains the batch
counter task (tests/tasks/batch_counter.py) in ps-async: its parameters count,
slot by slot, how often each batch index was applied. Half-way through, one
agent gets SIGTERM, as ``systemctl stop`` sends it. The agent must exit 0; the
job's next generation must lack its worker; the job must complete on the
other node; and every batch must have been applied exactly once on both
shards (none lost with the drained worker's range, none applied twice).

The same in allreduce, where the drained worker must finish its step with the
survivor before it leaves: the survivor never sees a broken collective, and
the batches 0, 1, 2, ... the job consumed were each applied once.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from dataclasses import replace

import pytest

from elasticd.client import JobClient
from elasticd.local import LocalCluster
from elasticd.membership import Generation
from elasticd.retry import wait_until
from elasticd.server.controller.planning import ClusterSnapshot, Seal, decide, seal_at_once
from elasticd.worker.agent.drain import AwaitSeal, DrainView, Leave, StopNow, next_step
from elasticd.worker.agent.drain_request import target_node
from tests.fixtures.batch_counts import (
    TASK,
    applied_counts,
    assert_each_batch_once,
    assert_prefix_once,
)
from tests.jobs import spec_yaml
from tests.test_exactly_once import SPEC as EXACTLY_ONCE_SPEC
from tests.test_membership import PS, nodes, report, snapshot
from tests.test_ps_failures import KeyLog
from tests.test_ps_restore import record

BATCHES = 160
SPEC = {
    **EXACTLY_ONCE_SPEC,
    "steps": BATCHES,
    "task_args": {"batches": BATCHES, "step_delay_s": 0.02},
    "data": {"shard_batches": 16, "epoch_batches": BATCHES},
    # no restart to spend: a drained worker must never be counted as a failure
    "max_restarts": 0,
}


W = ("job", "n.0")


@pytest.mark.parametrize(
    ("running", "elapsed", "timeout", "step"),
    [
        ({W}, 1.0, 60.0, AwaitSeal(frozenset({W}))),  # the controller has not sealed yet
        (set(), 1.0, 60.0, Leave()),  # every process is out: leave
        ({W}, 60.0, 60.0, StopNow(frozenset({W}))),  # timed out: stop them anyway
        ({W}, 0.0, 0.0, StopNow(frozenset({W}))),  # no controller leads: nobody will seal
        (set(), 60.0, 60.0, Leave()),
    ],
)
def test_what_a_draining_agent_does_next(running, elapsed, timeout, step) -> None:
    assert next_step(DrainView(frozenset(running), elapsed, timeout)) == step


def test_a_draining_node_loses_its_workers_at_once() -> None:
    job = snapshot(["a.0", "b.0"], reports=[report("a.0", "RUNNING"), report("b.0", "RUNNING")])
    cluster = nodes(a=1, b=1)
    cluster["b"] = replace(cluster["b"], draining=True)
    action = decide(job, ClusterSnapshot(cluster, PS))
    assert isinstance(action, Seal) and action.workers == ("a.0",)
    assert "lost=b.0" in action.reason
    assert seal_at_once(action, job.generation.worker_ids, job.spec) == action  # no join window
    # and no job starts on it
    assert decide(snapshot(None), ClusterSnapshot(cluster, PS)).workers == ("a.0",)


def test_which_node_elasticd_agent_drain_means() -> None:
    registered = nodes(a=1, b=1)
    registered = {
        "a": replace(registered["a"], hostname="h1"),
        "b": replace(registered["b"], hostname="h2"),
    }
    assert target_node(registered, None, "h2") == "b"
    assert target_node(registered, "a", "h2") == "a"
    with pytest.raises(ValueError, match="--node-id: no agent is registered as 'c'"):
        target_node(registered, "c", "h1")
    with pytest.raises(ValueError, match="--node-id: 0 agents are registered from host 'h3'"):
        target_node(registered, None, "h3")


DEPARTING = """
import os, signal, sys, time
from elasticd.worker.runtime.departure import Departure
d = Departure(grace_s=0.2)
d.install()
if sys.argv[1] == "in-step":
    with d.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        print("asked", d.asked, flush=True)  # alive: it waits for the step boundary
        time.sleep(60)  # a step that never ends: the grace runs out
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("where", "code", "out"), [("in-step", 143, "asked True\n"), ("", -15, "")]
)
def test_sigterm_waits_for_the_step_boundary_only_in_a_step_and_not_forever(where, code, out):
    run = subprocess.run(
        [sys.executable, "-c", DEPARTING, where], capture_output=True, text=True, timeout=60
    )
    assert (run.returncode, run.stdout) == (code, out), run.stderr


def generation_log(c: LocalCluster, job_id: str) -> KeyLog:
    """Every generation the job sealed, from its first: watched from the job's admission, as
    the session's etcd may be compacted past revision 1 by an earlier test."""
    admitted = c.client.get(c.keys.job_spec(job_id)).create_revision
    return KeyLog(c, c.keys.generation(job_id), Generation.from_json, admitted)


def test_sigterm_to_an_agent_drains_its_workers_and_loses_no_step(cluster, tmp_path):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(**SPEC))
    generations = generation_log(c, job_id)
    try:
        wait_until(
            lambda: any(len(g.members) == 2 for g in generations.seen()), 60, "both workers in"
        )
        wait_until(lambda: client.get(job_id).step >= 40, 120, "step 40")
        drained_at = len(generations.seen())
        c.kill("node-1", signal.SIGTERM)
        code = c.procs["node-1"].popen.returncode
        final = wait_until(
            lambda: (r := record(c, job_id)).state in ("COMPLETED", "FAILED", "CANCELLED") and r,
            180,
            "the job to end",
        )
        seen = generations.seen()
    finally:
        generations.close()
        client.close()
    agent_log = c.procs["node-1"].log_path.read_text()
    assert code == 0, f"the drained agent exited {code}:\n{agent_log[-3000:]}"
    assert "event=drained" in agent_log, (
        "the workers were stopped before the controller let them go"
    )
    assert (final.state, final.step) == ("COMPLETED", BATCHES), final.message
    after = [sorted(g.worker_ids) for g in seen[drained_at:]]
    assert after and after[0] == ["node-0.0"], f"generations after the drain: {after}"

    controller_log = (c.base_dir / "logs" / "controller-0.log").read_text()
    assert "event=data_reclaimed" in controller_log  # the drained worker's range went back

    counts = applied_counts(c.base_dir / "checkpoints", job_id)
    (tmp_path / "applied.json").write_text(json.dumps(counts))
    assert_each_batch_once(counts, BATCHES)


def test_elasticd_agent_drain_asks_the_running_agent_to_leave(cluster):
    c = cluster(ps=0, agents=1)
    base = [sys.executable, "-m", "elasticd", "agent", "--drain", "--etcd", c.etcd]
    base += ["--prefix", c.prefix]
    bad = subprocess.run([*base, "--node-id", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--node-id: no agent is registered as 'nope'" in bad.stderr
    assert c.procs["node-0"].alive(), "a bad request drained an agent"

    # no --node-id: the one agent registered from this host
    done = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "agent node-0 drained and left" in done.stdout
    agent = c.procs["node-0"].popen
    assert agent.wait(timeout=30) == 0
    assert "event=drained" in c.procs["node-0"].log_path.read_text()
    assert c.client.get(c.keys.drain_request("node-0")) is None  # the agent took it away


ALLREDUCE_STEPS = 120  # a step consumes one batch per worker
ALLREDUCE_SPEC = {
    "task": str(TASK),
    "mode": "allreduce",
    "steps": ALLREDUCE_STEPS,
    "workers": {"min": 1, "max": 2},
    # lr 1 at 2 workers, 0.5 alone: every batch applied takes 0.5 off its slot
    "optimizer": {"name": "sgd", "lr": 1.0},
    "task_args": {"batches": 2 * ALLREDUCE_STEPS, "step_delay_s": 0.02},
    "report_every_steps": 5,
    "max_restarts": 0,
}


@pytest.mark.slow
def test_sigterm_to_an_agent_in_an_allreduce_job_loses_no_step(cluster):
    """The drained node hosts rank 0 (and so the group's store): its worker finishes its
    step with the survivor and leaves, the survivor re-forms alone, and the job consumes
    batches 0, 1, 2, ... each once."""
    c = cluster(ps=0, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(**ALLREDUCE_SPEC))
    generations = generation_log(c, job_id)
    try:
        both = wait_until(
            lambda: len((s := client.get(job_id)).workers) == 2 and s.step >= 30 and s,
            120,
            "step 30 with both workers",
        )
        drained = next(w.worker_id for w in both.workers if w.rank == 0)
        node = drained.rsplit(".", 1)[0]
        drained_at = len(generations.seen())
        c.kill(node, signal.SIGTERM)
        code = c.procs[node].popen.returncode
        final = client.wait(job_id, timeout=180, interval=0.5)
        seen = generations.seen()
    finally:
        generations.close()
        client.close()
    agent_log = c.procs[node].log_path.read_text()
    assert code == 0, f"the drained agent exited {code}:\n{agent_log[-3000:]}"
    assert "event=drained" in agent_log, "the worker was stopped before the controller let it go"
    assert (final.state, final.step) == ("COMPLETED", ALLREDUCE_STEPS), final
    after = [sorted(g.worker_ids) for g in seen[drained_at:]]
    survivor = next(w.worker_id for w in both.workers if w.worker_id != drained)
    assert after and all(ids == [survivor] for ids in after), f"generations after: {after}"
    # At a step boundary: the drained rank finished its step with the survivor and
    # left; the survivor's collectives never broke.
    logs = c.base_dir / "logs" / job_id
    assert f"event=departed job={job_id} generation=1 " in (logs / f"{drained}.log").read_text()
    assert "event=collective_failed" not in (logs / f"{survivor}.log").read_text()
    # Steps consumed batches 0, 1, 2, ... one per worker: a prefix, each applied once.
    used = assert_prefix_once(applied_counts(c.base_dir / "checkpoints", job_id, 0.5))
    assert ALLREDUCE_STEPS < used < 2 * ALLREDUCE_STEPS, used  # some steps ran alone


@pytest.mark.slow
def test_draining_an_allreduce_job_below_its_minimum_keeps_no_process_on_the_node(cluster):
    """``workers.min: 2`` on two nodes: without the drained node the job waits, and the
    survivor waits in it as a standby holding the replica. The drained node's process
    is not kept as a standby too (the agent would wait out its drain timeout for it):
    the agent leaves at once, and a node that joins later takes the survivor's state."""
    c = cluster(ps=0, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        job_id = client.submit_yaml(
            spec_yaml(**{**ALLREDUCE_SPEC, "workers": {"min": 2, "max": 2}})
        )
        both = wait_until(
            lambda: len((s := client.get(job_id)).workers) == 2 and s.step >= 30 and s,
            120,
            "step 30 with both workers",
        )
        node = both.workers[1].worker_id.rsplit(".", 1)[0]
        c.kill(node, signal.SIGTERM)
        code = c.procs[node].popen.returncode
        wait_until(lambda: client.get(job_id).state == "WAITING", 60, "the job to wait")
        c.start_agent("node-2")
        final = client.wait(job_id, timeout=180, interval=0.5)
    finally:
        client.close()
    agent_log = c.procs[node].log_path.read_text()
    assert code == 0 and "event=drained" in agent_log, agent_log[-3000:]
    assert (final.state, final.step) == ("COMPLETED", ALLREDUCE_STEPS), final
    logs = c.base_dir / "logs" / job_id
    drained = both.workers[1].worker_id
    assert f"event=departed job={job_id} generation=1 " in (logs / f"{drained}.log").read_text()
    # The newcomer had no state and took the survivor's, mid-training.
    synced = re.search(
        r"event=state_synced .* step=(\d+) .*had_state=False", (logs / "node-2.0.log").read_text()
    )
    assert synced and int(synced[1]) >= both.step, synced
    # Two workers at every step: batches 0 .. 2 * steps - 1, each applied once.
    counts = applied_counts(c.base_dir / "checkpoints", job_id, 0.5)
    assert assert_prefix_once(counts) == 2 * ALLREDUCE_STEPS
