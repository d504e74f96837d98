"""Every daemon of a local cluster serves Prometheus /metrics, fed by what it holds.

The workers' figures (step, loss, samples/s) reach the controller's metrics in
their progress reports over gRPC, never through etcd. One job checkpoints and
loses a training process to SIGKILL: the controller counts the checkpoint and
the recovery, the agent the restart, and every daemon times its lease keepalives.
"""

from __future__ import annotations

import re
import signal
import urllib.request

from elasticd.client import JobClient
from elasticd.retry import wait_until
from elasticd.tensorboard_events import read_scalars
from tests.jobs import spec_yaml
from tests.test_local_cluster import processes_of_job


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample at ``url``."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def value(samples: dict[str, float], name: str, **labels: str) -> float | None:
    for key, v in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == want for k, want in labels.items()):
            return v
    return None


def test_every_daemon_serves_its_metrics(cluster, tmp_path) -> None:
    c = cluster(ps=1, agents=2, metrics=True)
    urls = c.wait_metrics(60)
    assert set(urls) == {"controller-0", "ps-0", "node-0", "node-1"}
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    spec = spec_yaml(
        steps=100_000,
        checkpoint={"every_steps": 20},
        max_restarts=3,
        tensorboard=str(tmp_path / "tb"),
    )
    job = client.submit_yaml(spec)
    wait_until(lambda: client.get(job).checkpoint, 120, "a checkpoint")
    (victim,) = wait_until(lambda: processes_of_job(job, "node-1.0"), 60, "node-1.0 running")
    victim.send_signal(signal.SIGKILL)

    def controller_sees_recovery():
        s = scrape(urls["controller-0"])
        return s if (value(s, "elasticd_job_recoveries_total", job=job) or 0) >= 1 else None

    ctl = wait_until(controller_sees_recovery, 120, "the controller to count a recovery")
    assert value(ctl, "elasticd_controller_leader") == 1
    assert value(ctl, "elasticd_jobs", state="RUNNING") == 1
    assert value(ctl, "elasticd_job_step", job=job) > 0
    assert value(ctl, "elasticd_job_generation", job=job) >= 1
    assert value(ctl, "elasticd_job_checkpoint_step", job=job) >= 20
    assert value(ctl, "elasticd_job_loss", job=job) > 0
    assert value(ctl, "elasticd_job_recovery_seconds_count", job=job) >= 1
    assert value(ctl, "elasticd_job_recovery_seconds_sum", job=job) > 0
    assert value(ctl, "elasticd_job_checkpoints_total", job=job) >= 1
    assert value(ctl, "elasticd_job_checkpoint_bytes_total", job=job) > 0
    assert value(ctl, "elasticd_job_checkpoint_seconds_count", job=job) >= 1

    def controller_sees_training():
        s = scrape(urls["controller-0"])
        return s if (value(s, "elasticd_job_samples_per_second", job=job) or 0) > 0 else None

    ctl = wait_until(controller_sees_training, 60, "the controller's metrics to show training")
    assert value(ctl, "elasticd_job_step_seconds", job=job) > 0
    assert value(ctl, "elasticd_job_workers", job=job) >= 1

    ps = scrape(urls["ps-0"])
    assert value(ps, "elasticd_ps_pushes_applied_total", job=job) > 0
    assert value(ps, "elasticd_ps_bytes_received_total", job=job) > 0
    assert value(ps, "elasticd_ps_pushes_rejected_total", job=job, reason="stale") is not None
    restarted = {}
    for node in ("node-0", "node-1"):
        agent = scrape(urls[node])
        assert value(agent, "elasticd_agent_slots", node=node) == 1
        restarted[node] = value(agent, "elasticd_agent_processes_restarted_total", node=node)
    assert restarted == {"node-0": 0, "node-1": 1}
    daemons = {"controller": "controller-0", "ps:ps-0": "ps-0", "agent:node-1": "node-1"}
    for process, daemon in daemons.items():

        def kept_alive(p=process, d=daemon) -> bool:
            n = value(scrape(urls[d]), "elasticd_lease_keepalive_seconds_count", process=p)
            return (n or 0) >= 1

        wait_until(kept_alive, 30, f"a lease keepalive of {process}")
    # The controller wrote the job's TensorBoard scalars, one set per new step.
    (events,) = (tmp_path / "tb" / job).glob("events.out.tfevents.*")
    scalars = read_scalars(events)
    tags = {tag for _, tag, _ in scalars}
    assert tags == {"loss", "samples_per_second", "workers", "generation"}
    steps = [step for step, tag, _ in scalars if tag == "generation"]
    assert steps == sorted(set(steps)) and steps[-1] > 0
    assert {v for _, tag, v in scalars if tag == "workers"} <= {1.0, 2.0}
    assert any(v > 0 for _, tag, v in scalars if tag == "samples_per_second")
    assert all(v >= 1 for _, tag, v in scalars if tag == "generation")
    client.cancel(job)
    client.close()
