"""The agent's warm interpreters: started in advance, taken by a launch, replaced.

Real processes of the real training runtime: a warm one is taken for a
launch (same pid), becomes that process (its log file and environment), and
another starts in its place; one that dies while it waits is replaced too.
"""

from __future__ import annotations

import os
import queue
import signal

import pytest

from elasticd.retry import wait_until
from elasticd.worker.agent.api import ProcessSpec
from elasticd.worker.agent.launch import RUNTIME_ARGV
from elasticd.worker.agent.supervisor import ProcessSupervisor

pytestmark = pytest.mark.slow  # whole clusters or many processes: run first (conftest)


@pytest.fixture
def supervisor(tmp_path):
    exits: queue.Queue = queue.Queue()
    sup = ProcessSupervisor(exits.put, warm=1, warm_argv=RUNTIME_ARGV, warm_log_dir=str(tmp_path))
    try:
        yield sup, exits
    finally:
        sup.stop_all(grace=2)


def assignment(mode: str) -> dict:
    member = {"worker_id": "n.0", "node_id": "n", "rank": 0, "local_rank": 0}
    return {
        "job_id": "j",
        "worker_id": "n.0",
        "generation": 1,
        "world_size": 1,
        "members": [member],
        "spec": {"mode": mode},
        "controller": "127.0.0.1:1",
    }


def spec(tmp_path, worker: str) -> ProcessSpec:
    env = {"ELASTICD_JOB_ID": "j", "ELASTICD_WORKER_ID": worker}
    return ProcessSpec("j", worker, RUNTIME_ARGV, env, str(tmp_path / f"{worker}.log"))


def test_a_launch_takes_a_warm_interpreter_which_becomes_the_process(supervisor, tmp_path):
    sup, exits = supervisor
    # The first launch starts cold, and fills the pool.
    first = sup.start(spec(tmp_path, "n.0"), {"assignment": assignment("no-such-mode")})
    assert exits.get(timeout=60).key == ("j", "n.0")
    warm = wait_until(lambda: sup.warm_pids(), 60, "a warm interpreter")
    assert first not in warm

    sup.preload("j", "json")  # an importable module: the warm process imports it and waits on
    pid = sup.start(spec(tmp_path, "n.1"), {"assignment": assignment("no-such-mode")})
    assert pid == warm[0]  # no new interpreter
    exited = exits.get(timeout=60)
    assert (exited.key, exited.pid, exited.code) == (("j", "n.1"), pid, 2)
    # It wrote to the log of the process it became, under that worker's name.
    text = (tmp_path / "n.1.log").read_text()
    assert "event=unsupported_mode mode=no-such-mode" in text and f"pid={pid}" in text
    assert "worker:n.0" in text  # its logging names the assignment's worker
    # And another waits in its place.
    again = wait_until(lambda: sup.warm_pids(), 60, "the pool refilled")
    assert pid not in again


def test_a_warm_interpreter_that_dies_idle_is_replaced_and_reported_to_nobody(supervisor, tmp_path):
    sup, exits = supervisor
    sup.start(spec(tmp_path, "n.0"), {"assignment": assignment("no-such-mode")})
    exits.get(timeout=60)
    warm = wait_until(lambda: sup.warm_pids(), 60, "a warm interpreter")
    os.kill(warm[0], signal.SIGKILL)
    replaced = wait_until(
        lambda: (p := sup.warm_pids()) and p[0] != warm[0] and p, 60, "a replacement"
    )
    assert replaced[0] != warm[0]
    assert exits.empty()  # no worker of any job exited
