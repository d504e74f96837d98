"""Switching a running job ps-async → allreduce → ps-async, on real processes.

Every worker logs a sha256 of the parameters and torch.optim state it hands
over (switched_out) and of what the next mode holds after taking it
(switched_in). Across each switch, all of them must be one and the same.
"""

from __future__ import annotations

import re

import grpc
import pytest

from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import spec_yaml

DIGEST = re.compile(
    r"event=switched_(out|in) job=\S+ generation=(\d+) worker=(\S+) step=(\d+) "
    r"digest=(\w+)(?: sent=(\w+))?"
)


def digests(c, job_id: str) -> dict[int, set[tuple[str, int, str, str]]]:
    """generation -> {(direction, step, digest, sent)} over every worker's log."""
    out: dict[int, set[tuple[str, int, str, str]]] = {}
    for log in (c.base_dir / "logs" / job_id).glob("*.log"):
        for direction, gen, _worker, step, digest, sent in DIGEST.findall(log.read_text()):
            out.setdefault(int(gen), set()).add((direction, int(step), digest, sent))
    return out


def test_scheduled_switches_keep_parameters_and_optimizer_state_bitwise(cluster):
    c = cluster(ps=2, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(
        spec_yaml(
            steps=400,
            optimizer={"name": "adam", "lr": 0.01},
            workers={"min": 2, "max": 2},
            report_every_steps=5,
            switch=[{"at_step": 100, "mode": "allreduce"}, {"at_step": 250, "mode": "ps-async"}],
        )
    )
    status = client.wait(job_id, timeout=240, interval=0.5)
    assert status.state == "COMPLETED", status
    assert status.mode == "ps-async" and status.step == 400
    assert status.loss < status.first_loss / 10

    seen = digests(c, job_id)
    assert len(seen) == 2, seen  # one generation per switch
    to_allreduce, to_ps = (seen[g] for g in sorted(seen))
    # ps-async -> allreduce: every worker exported the same state from the PS
    # tier, and every replica holds exactly it after loading.
    outs = {(s, d) for direction, s, d, _ in to_allreduce if direction == "out"}
    ins = {(s, d) for direction, s, d, _ in to_allreduce if direction == "in"}
    assert len(outs) == 1 and outs == ins, to_allreduce
    # allreduce -> ps-async: both replicas handed over one state; rank 0 sent it
    # and the shards hold exactly what was sent (their digests, taken on import).
    outs2 = {(s, d) for direction, s, d, _ in to_ps if direction == "out"}
    (landed,) = [(s, d, sent) for direction, s, d, sent in to_ps if direction == "in"]
    assert len(outs2) == 1 and landed[1] == landed[2], to_ps
    first_step, second_step = next(iter(outs))[0], next(iter(outs2))[0]
    assert 100 <= first_step < second_step and second_step >= 250 and landed[0] == second_step
    client.close()


def test_switch_on_demand_and_refusals(cluster):
    c = cluster(ps=1, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=10**7, workers={"min": 2, "max": 2}))
    wait_until(lambda: client.get(job_id).step >= 20, 60, "training under way")
    with pytest.raises(grpc.RpcError) as info:
        client.switch(job_id, "script")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = client.switch(job_id, "allreduce")
    assert status.mode == "allreduce"
    gen = status.generation
    step = client.get(job_id).step
    wait_until(
        lambda: (s := client.get(job_id)).step > step + 20 and s.generation == gen,
        60,
        "allreduce training after the switch",
    )
    assert digests(c, job_id)[gen]  # the hand-over happened
    client.cancel(job_id)
    with pytest.raises(grpc.RpcError) as info:
        client.switch(job_id, "ps-async")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.close()
