"""PS figures: scraped over HTTP from the Prometheus endpoint, and read by the Stats RPC.

Every counter is checked against the exact traffic a test caused: bytes in
and out, pulls, pushes applied and rejected by reason, the staleness of the
applied ones, and one optimizer-step observation per applied update.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from elasticd.local import free_port
from elasticd.ps_control import drop_shards
from elasticd.ps_errors import Fenced, StaleGradient
from elasticd.retry import wait_until
from elasticd.rpc import ps_pb2
from elasticd.server.ps.metrics import serve_metrics
from tests.fixtures.ps import JOB, PSCluster
from tests.test_ps_malformed import malformed_push
from tests.test_ps_service import B_BYTES, W_BYTES, tiny_placement, tiny_tensors

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

TINY = W_BYTES + B_BYTES


@pytest.fixture
def metrics_url(ps_cluster: PSCluster) -> Iterator[Callable[..., str]]:
    servers = []

    def url_of(ps) -> str:
        server = serve_metrics(ps.servicer.registry, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/metrics"

    yield url_of
    for s in servers:
        s.shutdown()
        s.server_close()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample on the page, keyed by (name, sorted labels).

    A primary copy's series are keyed by job alone, after checking that their
    group is the PS's own (tiny_placement puts the one group there).
    """
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if labels.pop("role", "primary") == "primary" and "group" in labels:
                assert labels.pop("group").startswith("ps-"), s
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def ones() -> dict[str, torch.Tensor]:
    return {k: torch.ones_like(v) for k, v in tiny_tensors().items()}


def test_metrics_count_what_happened(ps_cluster: PSCluster, metrics_url) -> None:
    (ps,) = ps_cluster.start(1)
    url = metrics_url(ps)
    tier = ps_cluster.tier([ps], tiny_placement(ps), generation=2)
    tier.init(tiny_tensors(), "sgd", {"lr": 0.1}, 1, 1, 0)  # max_staleness 1

    out = dict(tiny_tensors())
    for base in (0, 1, 2):
        tier.pull_into(out)
        tier.push(ones(), {ps.ps_id: base})  # staleness 0, three times
    tier.push(ones(), {ps.ps_id: 2})  # staleness 1
    with pytest.raises(StaleGradient):
        tier.push(ones(), {ps.ps_id: 2})  # 2 versions old now
    with pytest.raises(Fenced):
        ps_cluster.tier([ps], tiny_placement(ps), generation=1).push(ones(), {ps.ps_id: 4})
    stub = ps_cluster.stub(ps)
    with pytest.raises(grpc.RpcError):
        stub.Push(iter(malformed_push("too-few-bytes")), timeout=10)  # generation 1: fenced too
    for case in ("too-many-bytes", "unknown-job"):
        requests = malformed_push(case)
        requests[0].header.fence.generation = 2
        with pytest.raises(grpc.RpcError):
            stub.Push(iter(requests), timeout=10)
    tier.push(ones(), {ps.ps_id: 4}, compression="fp16")  # staleness 0, 2 bytes a value

    m = scrape(url)
    job = (("job", JOB),)

    def rejected(reason: str) -> float:
        return m[("elasticd_ps_pushes_rejected_total", (("job", JOB), ("reason", reason)))]

    assert m[("elasticd_ps_pulls_total", job)] == 3
    assert m[("elasticd_ps_bytes_sent_total", job)] == 3 * TINY
    # init + 5 dense pushes that arrived whole + 52 bytes of "too-many-bytes" (48 + 4,
    # refused at the first chunk) + one fp16 push. Fenced pushes are refused before their
    # bytes are read; the "too-few-bytes" push came from generation 1.
    dense_pushes = 4 + 1  # four applied, one stale
    assert (
        m[("elasticd_ps_bytes_received_total", job)] == TINY * (1 + dense_pushes) + 52 + TINY // 2
    )
    assert m[("elasticd_ps_pushes_applied_total", job)] == 5
    assert rejected("stale") == 1
    assert rejected("fenced") == 2
    assert rejected("malformed") == 1
    assert rejected("duplicate") == 0
    assert m[("elasticd_ps_unknown_job_requests_total", ())] == 1
    assert m[("elasticd_ps_push_staleness_count", job)] == 5
    assert m[("elasticd_ps_push_staleness_sum", job)] == 1
    assert m[("elasticd_ps_push_staleness_bucket", (("job", JOB), ("le", "0.0")))] == 4
    assert m[("elasticd_ps_push_staleness_bucket", (("job", JOB), ("le", "1.0")))] == 5
    assert m[("elasticd_ps_optimizer_step_seconds_count", job)] == 5
    assert m[("elasticd_ps_optimizer_step_seconds_sum", job)] > 0
    assert m[("elasticd_ps_shard_version", job)] == 5
    assert m[("elasticd_ps_shard_generation", job)] == 2
    assert m[("elasticd_ps_shard_bytes", job)] == TINY

    # The Stats RPC gives the same figures.
    stats = tier.stats()[ps.ps_id]
    assert (stats.job_id, stats.version, stats.generation, stats.bytes) == (JOB, 5, 2, TINY)
    assert stats.bytes_in == m[("elasticd_ps_bytes_received_total", job)]
    assert (stats.bytes_out, stats.pulls, stats.pushes_applied) == (3 * TINY, 3, 5)
    assert dict(stats.pushes_rejected) == {"stale": 1, "fenced": 2, "malformed": 1}
    assert list(stats.staleness.counts[:3]) == [4, 1, 0]
    assert stats.optimizer_step_seconds.count == 5
    assert stats.snapshot_pause_seconds.count == 0

    # A snapshot's hold of the shard lock (the pause a checkpoint costs) is measured.
    tier.export_state()
    assert tier.stats()[ps.ps_id].snapshot_pause_seconds.count == 1
    m = scrape(url)
    assert m[("elasticd_ps_snapshot_pause_seconds_count", job)] == 1
    assert m[("elasticd_ps_snapshot_pause_seconds_sum", job)] > 0


def test_servers_in_one_process_keep_separate_figures(ps_cluster: PSCluster, metrics_url) -> None:
    a, b = ps_cluster.start(2)
    url_a, url_b = metrics_url(a), metrics_url(b)
    ps_cluster.tier([a], tiny_placement(a)).init(tiny_tensors(), "sgd", {"lr": 0.1}, -1, 1, 0)
    tier_b = ps_cluster.tier([b], tiny_placement(b), job="job-b")
    tier_b.init(tiny_tensors(), "sgd", {"lr": 0.1}, -1, 1, 0)
    tier_b.push(ones(), {b.ps_id: 0})

    ma, mb = scrape(url_a), scrape(url_b)
    assert ma[("elasticd_ps_pushes_applied_total", (("job", JOB),))] == 0
    assert ("elasticd_ps_pushes_applied_total", (("job", "job-b"),)) not in ma
    assert mb[("elasticd_ps_pushes_applied_total", (("job", "job-b"),))] == 1
    assert ("elasticd_ps_pushes_applied_total", (("job", JOB),)) not in mb

    # A dropped shard's series go with it.
    assert drop_shards("job-b", 1, {b.ps_id: b.address}) == {}
    assert ("elasticd_ps_pushes_applied_total", (("job", "job-b"),)) not in scrape(url_b)
    reply = ps_cluster.stub(b).Stats(ps_pb2.StatsRequest())
    assert (reply.ps_id, list(reply.jobs)) == (b.ps_id, [])
    with pytest.raises(grpc.RpcError) as err:
        ps_cluster.stub(b).Stats(ps_pb2.StatsRequest(job_id="job-b"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_elasticd_ps_serves_metrics_when_asked(etcd, prefix: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "elasticd", "ps", "--etcd", etcd.endpoint, "--prefix", prefix,
         "--id", "ps-m", "--metrics-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "ps ps-m listening on" in line, proc.stderr.read() if proc.poll() else line
        m = wait_until(
            lambda: _try_scrape(f"http://127.0.0.1:{port}/metrics"), 30, "the metrics endpoint"
        )
        assert m[("elasticd_ps_unknown_job_requests_total", ())] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"event=metrics_ready ps=ps-m url=http://127.0.0.1:{port}/metrics" in err


def _try_scrape(url: str) -> dict | None:
    try:
        return scrape(url)
    except OSError:
        return None
