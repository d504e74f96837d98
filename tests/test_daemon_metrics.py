"""Every daemon of a local cluster serves Prometheus /metrics, fed by what it holds.

The workers' figures (step, loss, samples/s) reach the controller's metrics in
their progress reports over gRPC, never through etcd.
"""

from __future__ import annotations

import re
import urllib.request

from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import spec_yaml


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


def test_every_daemon_serves_its_metrics(cluster) -> None:
    c = cluster(ps=1, agents=2, metrics=True)
    urls = c.wait_metrics(60)
    assert set(urls) == {"controller-0", "ps-0", "node-0", "node-1"}
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job = client.submit_yaml(spec_yaml(steps=100_000, checkpoint={"every_steps": 20}))
    wait_until(lambda: client.get(job).checkpoint, 120, "a checkpoint")

    def controller_sees_training():
        s = scrape(urls["controller-0"])
        return s if (value(s, "elasticd_job_samples_per_second", job=job) or 0) > 0 else None

    ctl = wait_until(controller_sees_training, 60, "the controller's metrics to show training")
    assert value(ctl, "elasticd_controller_leader") == 1
    assert value(ctl, "elasticd_jobs", state="RUNNING") == 1
    assert value(ctl, "elasticd_job_step", job=job) > 0
    assert value(ctl, "elasticd_job_workers", job=job) == 2
    assert value(ctl, "elasticd_job_generation", job=job) >= 1
    assert value(ctl, "elasticd_job_checkpoint_step", job=job) >= 20
    assert value(ctl, "elasticd_job_loss", job=job) > 0

    ps = scrape(urls["ps-0"])
    assert value(ps, "elasticd_ps_pushes_applied_total", job=job) > 0
    assert value(ps, "elasticd_ps_bytes_received_total", job=job) > 0
    for node in ("node-0", "node-1"):
        agent = scrape(urls[node])
        assert value(agent, "elasticd_agent_slots", node=node) == 1
        assert value(agent, "elasticd_agent_processes", node=node, state="RUNNING") == 1
        assert value(agent, "elasticd_agent_process_restarts", node=node) == 0
    client.cancel(job)
    client.close()
