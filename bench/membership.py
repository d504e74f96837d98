"""Membership benchmark: how fast generations follow losses, joins and bursts.

Runs a real local cluster (etcd, controller, one PS, agents) with the
production lease TTL and join window, and a ps-async job that trains
throughout. Measures:

* ``node_loss_to_new_generation_s`` — SIGKILL an agent, time until a
  generation without it is sealed (median of ``--kills``). Bounded below by
  the lease TTL: a dead agent is only known dead when its lease expires.
* ``join_to_generation_s`` — start an agent process, time until a generation
  including it is sealed (median). Includes the agent's own start-up.
* ``burst_generations`` — start ``--burst`` agents at once, count the
  generations it takes until all of them are members (goal: 1 or 2).

The baseline for the loss figure is the lease TTL itself (``lease_ttl_s``):
``loss_over_ttl`` is the ratio.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from elasticd.client import JobClient
from elasticd.coord.keys import DEFAULT_PREFIX
from elasticd.coord.session import DEFAULT_TTL_S
from elasticd.local import LocalCluster
from elasticd.membership import Generation
from elasticd.retry import wait_until
from elasticd.server.controller.join_window import JOIN_WINDOW_S

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _generation(c: LocalCluster, job_id: str) -> Generation | None:
    kv = c.client.get(c.keys.generation(job_id))
    return Generation.from_json(kv.value) if kv else None


def _job(client: JobClient, name: str, max_workers: int) -> str:
    spec = {
        "name": name,
        "mode": "ps-async",
        "task": str(EXAMPLES / "linreg.py"),
        "steps": 10**9,
        "batch_size": 16,
        "workers": {"min": 1, "max": max_workers},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "report_every_steps": 50,
    }
    return client.submit_yaml(yaml.safe_dump(spec))


def _wait_members(
    c: LocalCluster, job_id: str, pred, timeout: float, what: str
) -> tuple[Generation, float]:
    gen = wait_until(
        lambda: (g := _generation(c, job_id)) and pred(g) and g, timeout, what, interval=0.02
    )
    return gen, time.monotonic()


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench membership")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S)
    p.add_argument("--join-window", type=float, default=JOIN_WINDOW_S)
    args = p.parse_args(argv)

    base = tempfile.mkdtemp(prefix="elasticd-bench-membership-")
    c = LocalCluster(
        base,
        prefix=DEFAULT_PREFIX,
        lease_ttl=args.lease_ttl,
        join_window=args.join_window,
        threads_per_worker=1,
    )
    try:
        c.start(ps=1, agents=1)
        client = JobClient(etcd=c.etcd, prefix=c.prefix)
        job_id = _job(client, "bench-loss", max_workers=args.kills + 2)
        _wait_members(c, job_id, lambda g: g.nodes == ["node-0"], 60, "the first generation")

        joins, losses = [], []
        for i in range(args.kills):
            node = f"extra-{i}"
            started = time.monotonic()
            c.start_agent(node)
            _, sealed = _wait_members(
                c, job_id, lambda g, n=node: n in g.nodes, 60, f"{node} to join"
            )
            joins.append(sealed - started)
            # Let its worker start before killing the agent, as in a real loss.
            time.sleep(1.0)
            killed = time.monotonic()
            c.kill(node, signal.SIGKILL)
            _, sealed = _wait_members(
                c, job_id, lambda g, n=node: n not in g.nodes, 60, f"{node} to leave"
            )
            losses.append(sealed - killed)
        client.cancel(job_id)

        burst_job = _job(client, "bench-burst", max_workers=args.burst + 1)
        _wait_members(c, burst_job, lambda g: g.nodes == ["node-0"], 60, "the burst job to start")
        first = _generation(c, burst_job).number
        started = time.monotonic()
        names = [f"burst-{i:02d}" for i in range(args.burst)]
        for node in names:
            c.start_agent(node)
        gen, sealed = _wait_members(
            c,
            burst_job,
            lambda g: set(names) <= set(g.nodes),
            300,
            f"all {args.burst} agents to join",
        )
        burst_generations = gen.number - first
        client.cancel(burst_job)
        client.close()
    finally:
        c.stop()

    loss = statistics.median(losses)
    return {
        "lease_ttl_s": args.lease_ttl,
        "join_window_s": args.join_window,
        "kills": args.kills,
        "node_loss_to_new_generation_s": round(loss, 3),
        "node_loss_samples_s": [round(x, 3) for x in losses],
        "loss_over_ttl": round(loss / args.lease_ttl, 3),
        "join_to_generation_s": round(statistics.median(joins), 3),
        "join_samples_s": [round(x, 3) for x in joins],
        "burst_agents": args.burst,
        "burst_generations": burst_generations,
        "burst_to_generation_s": round(sealed - started, 3),
    }
