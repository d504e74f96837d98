"""allreduce recovery is deterministic: SIGKILLs and replacements change no bit of the result.

With a fixed seed and ``workers.min == workers.max``, a job whose training
processes are SIGKILLed three times (each replaced by its agent, let back in
once ready, and given the survivor's state) ends bit for bit equal, in its
parameters and its optimizer state, to the same job run without a fault.
"""

from __future__ import annotations

import os
import signal

import torch

from elasticd.checkpoint import CheckpointStore
from elasticd.checkpoint.locate import load_state
from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import spec_yaml
from tests.test_join_when_ready import GATED
from tests.test_local_cluster import workers_of

STEPS = 600
KILL_AT = (100, 250, 400)  # steps after which a training process is SIGKILLed


def job(client: JobClient) -> str:
    return client.submit_yaml(
        spec_yaml(
            task=GATED,
            mode="allreduce",
            steps=STEPS,
            seed=7,
            workers={"min": 2, "max": 2},
            optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9},
            checkpoint={"every_steps": STEPS},
            report_every_steps=5,
            max_restarts=len(KILL_AT),
            task_args={"step_delay_s": 0.01},
        )
    )


def final_state(c, job_id: str):
    store = CheckpointStore(str(c.base_dir / "checkpoints"))
    newest = wait_until(
        lambda: (m := store.latest(job_id)) is not None and m.step == STEPS and m,
        60,
        f"{job_id}'s checkpoint of step {STEPS}",
    )
    return load_state(store, newest)


def test_sigkilled_and_replaced_workers_end_bit_for_bit_equal_to_a_fault_free_run(cluster):
    c = cluster(ps=0, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        clean = job(client)
        assert client.wait(clean, timeout=120, interval=0.5).state == "COMPLETED"

        faulty = job(client)
        for i, at in enumerate(KILL_AT):
            status = wait_until(
                lambda at=at: (s := client.get(faulty)).step >= at and len(s.workers) == 2 and s,
                120,
                f"step {at} with both workers",
            )
            victim = status.workers[i % 2].worker_id  # each rank in turn, rank 0 too
            os.kill(workers_of(c, faulty)[victim].pid, signal.SIGKILL)
            wait_until(
                lambda g=status.generation: client.get(faulty).generation > g,
                60,
                f"a generation after kill {i + 1}",
            )
        done = client.wait(faulty, timeout=180, interval=0.5)
        assert (done.state, done.step) == ("COMPLETED", STEPS), done
        agents = "".join(p.read_text() for p in (c.base_dir / "logs").glob("node-*.log"))
        assert agents.count(f"event=worker_restart job={faulty} ") == len(KILL_AT)
        assert f"event=worker_restart job={clean} " not in agents

        clean_params, clean_optim = final_state(c, clean)
        params, optim = final_state(c, faulty)
    finally:
        client.close()
    assert clean_params.keys() == params.keys()
    for name in params:
        assert torch.equal(clean_params[name], params[name]), name
    assert clean_optim.keys() == optim.keys()
    for name in optim:
        for key, value in optim[name].items():
            assert torch.equal(clean_optim[name][key], value), (name, key)
