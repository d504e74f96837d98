"""A hung peer (alive but silent) must not hang the job."""

from __future__ import annotations

import os
import re
import signal

from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import spec_yaml
from tests.test_local_cluster import workers_of


def test_sigstopped_allreduce_worker_is_killed_and_the_job_finishes(cluster):
    c = cluster(ps=0, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    steps = 1500
    job_id = client.submit_yaml(
        spec_yaml(
            mode="allreduce",
            steps=steps,
            report_every_steps=5,
            hang_timeout_s=6,
            allreduce={"collective_timeout_s": 2},
        )
    )
    wait_until(lambda: len(client.get(job_id).workers) == 2, 60, "2 workers")
    wait_until(lambda: client.get(job_id).step >= 20, 60, "training under way")
    victim = workers_of(c, job_id)["node-1.0"]
    os.kill(victim.pid, signal.SIGSTOP)  # alive, holds its sockets, answers nothing
    try:
        # Its agent sees the silence, kills it; the survivor carries on alone.
        agent_log = c.base_dir / "logs" / "node-1.log"
        wait_until(
            lambda: "event=worker_hung" in agent_log.read_text(),
            60,
            "node-1's agent to kill its hung worker",
        )
        status = client.wait(job_id, timeout=180, interval=0.5)
    finally:
        try:
            os.kill(victim.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert status.state == "COMPLETED", status
    assert status.step == steps
    assert f"event=worker_hung job={job_id}" in agent_log.read_text()
    # Left out: the survivor trained alone (its replacement comes back once it
    # is ready, if the job lasts that long: test_join_when_ready).
    sealed = re.findall(
        rf"event=generation_sealed job={job_id} generation=\d+ world=(\d+)",
        (c.base_dir / "logs" / "controller-0.log").read_text(),
    )
    assert sealed[:2] == ["2", "1"], sealed
