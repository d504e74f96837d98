"""A survivor keeps training while its peer's replacement starts (ARCHITECTURE invariant 9).

The replacement of a SIGKILLed allreduce process is held in its start-up (it
waits at a gate the test opens): the survivor must go on stepping alone
meanwhile, and the generation that lets the replacement back in is sealed
only once its agent reports it ready. The join window is far longer than the
test, so neither change can have waited for it. The replacement is a warm
interpreter: a process its agent had started before the failure.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import psutil

from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import spec_yaml
from tests.test_local_cluster import workers_of
from tests.test_ps_failures import ENDLESS

GATED = str(Path(__file__).parent / "tasks" / "gated_restart.py")
LONG_JOIN_WINDOW_S = 300.0
STEPS_ALONE = 300  # the survivor's progress, alone, while the replacement is held


def test_survivor_keeps_stepping_while_its_replacement_starts(cluster, tmp_path):
    gate = tmp_path / "gate"
    c = cluster(ps=0, agents=2, join_window=LONG_JOIN_WINDOW_S)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        job_id = client.submit_yaml(
            spec_yaml(
                task=GATED,
                mode="allreduce",
                steps=ENDLESS,
                report_every_steps=5,
                max_restarts=2,
                task_args={"gate": str(gate), "step_delay_s": 0.002},
            )
        )
        first = wait_until(
            lambda: len((s := client.get(job_id)).workers) == 2 and s.step >= 20 and s,
            60,
            "2 workers training",
        )
        victim = next(w.worker_id for w in first.workers if w.rank == 1)
        killed_pid = workers_of(c, job_id)[victim].pid
        warm = wait_until(
            lambda: warm_pids(c, victim.split(".")[0], killed_pid),
            60,
            "a warm interpreter on the victim's node",
        )
        os.kill(killed_pid, signal.SIGKILL)

        alone = sealed_after(client, job_id, first.generation, 1, "the survivor alone")
        # The replacement is running, and held: the survivor trains on without it.
        wait_until(
            lambda: client.get(job_id).step >= alone.step + STEPS_ALONE,
            60,
            f"the survivor to take {STEPS_ALONE} steps alone",
        )
        held = client.get(job_id)
        assert held.generation == alone.generation, held  # nobody let the starting one in
        report = workers_of(c, job_id)[victim]
        assert report.state == "RESTARTING" and report.pid not in (0, killed_pid), report
        assert report.pid in warm, (report.pid, warm)  # started before the failure

        gate.touch()
        back = sealed_after(client, job_id, alone.generation, 2, f"{victim} back once ready")
        assert workers_of(c, job_id)[victim].pid == report.pid  # the same process, let in
        wait_until(lambda: client.get(job_id).step >= back.step + 20, 60, "training with 2")
    finally:
        client.cancel(job_id)
        client.close()

    agent_log = "\n".join(p.read_text() for p in (c.base_dir / "logs").glob("node-*.log"))
    assert re.search(
        rf"event=standby_ready job={job_id} worker={victim} pid={report.pid}", agent_log
    )
    worker_log = (c.base_dir / "logs" / job_id / f"{victim}.log").read_text()
    synced = [ln for ln in worker_log.splitlines() if "event=state_synced" in ln]
    assert any(f"generation={back.generation} " in ln and "had_state=False" in ln for ln in synced)


def warm_pids(c, node: str, busy: int) -> set[int]:
    """Training interpreters of ``node``'s agent that run no worker (other than ``busy``)."""
    agent = psutil.Process(c.procs[node].popen.pid)
    return {
        p.pid
        for p in agent.children()
        if p.pid != busy and "elasticd.worker.runtime" in " ".join(p.cmdline())
    }


def sealed_after(client: JobClient, job_id: str, generation: int, workers: int, what: str):
    """The job's status once a generation after ``generation`` with ``workers`` workers runs."""
    return wait_until(
        lambda: (
            (s := client.get(job_id)).generation > generation and len(s.workers) == workers and s
        ),
        60,
        f"{what} (a generation after {generation} with {workers} workers)",
    )
