"""What a parameter server counts, and how it is served: the Stats RPC and Prometheus.

Each shard keeps its figures in a :class:`ShardStats` (plain counters and
fixed-bucket histograms under one lock), so they live and die with the shard.
A :class:`PSCollector` reads them at scrape time into a per-servicer
``CollectorRegistry`` (several servers in one process never collide), and the
Stats RPC reads the same objects. Nothing is computed twice.

Metrics (label ``job`` on all but the last):

- ``elasticd_ps_bytes_received_total``, ``elasticd_ps_bytes_sent_total``:
  tensor bytes in chunks (InitShard and Push in as they arrive, Pull out once a
  pull has sent the whole shard)
- ``elasticd_ps_pulls_total``
- ``elasticd_ps_pushes_applied_total``
- ``elasticd_ps_pushes_rejected_total{reason}``: ``stale``, ``fenced``,
  ``malformed``, ``duplicate``, ``round_aborted``, ``max_version``
- ``elasticd_ps_push_staleness`` (histogram, versions, of applied pushes)
- ``elasticd_ps_optimizer_step_seconds`` (histogram)
- ``elasticd_ps_snapshot_pause_seconds`` (histogram): how long a snapshot or
  export held the shard's lock, the pause a checkpoint costs training
- ``elasticd_ps_shard_version``, ``elasticd_ps_shard_generation``,
  ``elasticd_ps_shard_bytes`` (gauges)
- ``elasticd_ps_unknown_job_requests_total``: requests naming a job the PS
  does not hold
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from elasticd.daemon_metrics import serve_metrics  # noqa: F401  (re-exported)

STALENESS_BOUNDS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
STEP_SECONDS_BOUNDS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
REJECT_REASONS = (
    "stale",
    "fenced",
    "malformed",
    "duplicate",
    "round_aborted",
    "max_version",
    "replica_unavailable",
)


@dataclass
class Histogram:
    """Fixed buckets: counts[i] holds observations <= bounds[i] (and above bounds[i-1])."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last bucket: above every bound

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum, self.count)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, observations <= it), ending with +Inf."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


@dataclass
class StatsSnapshot:
    bytes_in: int
    bytes_out: int
    pulls: int
    pushes_applied: int
    pushes_rejected: dict[str, int]
    staleness: Histogram
    step_seconds: Histogram
    pause_seconds: Histogram


class ShardStats:
    """One shard's counters; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.pulls = 0
        self.pushes_applied = 0
        self.pushes_rejected: dict[str, int] = {}
        self.staleness = Histogram(STALENESS_BOUNDS)
        self.step_seconds = Histogram(STEP_SECONDS_BOUNDS)
        self.pause_seconds = Histogram(STEP_SECONDS_BOUNDS)

    def received(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_in += nbytes

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_out += nbytes

    def pulled(self) -> None:
        with self._lock:
            self.pulls += 1

    def applied(self, staleness: int) -> None:
        with self._lock:
            self.pushes_applied += 1
            self.staleness.observe(staleness)

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.pushes_rejected[reason] = self.pushes_rejected.get(reason, 0) + 1

    def stepped(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds.observe(seconds)

    def paused(self, seconds: float) -> None:
        """A snapshot or export held the shard's lock (pushes waited) this long."""
        with self._lock:
            self.pause_seconds.observe(seconds)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                self.bytes_in,
                self.bytes_out,
                self.pulls,
                self.pushes_applied,
                dict(self.pushes_rejected),
                self.staleness.copy(),
                self.step_seconds.copy(),
                self.pause_seconds.copy(),
            )


@dataclass(frozen=True)
class ShardFigures:
    """What the collector reads per job: the shard's state and its stats."""

    job_id: str
    generation: int
    version: int
    nbytes: int
    stats: StatsSnapshot
    group: str = ""
    backup: bool = False

    @property
    def labels(self) -> list[str]:
        return [self.job_id, self.group, "backup" if self.backup else "primary"]


class PSCollector(Collector):
    """Prometheus view of a PS: ``figures()`` lists every shard's figures at scrape time."""

    def __init__(
        self, figures: Callable[[], Iterable[ShardFigures]], unknown_jobs: Callable[[], int]
    ) -> None:
        self._figures = figures
        self._unknown_jobs = unknown_jobs

    def collect(self) -> Iterator[Metric]:
        shards = list(self._figures())
        job = [
            "job",
            "group",
            "role",
        ]  # a PS may hold a job's primary of one group, backup of another

        def counter(name: str, doc: str, value: Callable[[ShardFigures], float]):
            m = CounterMetricFamily(name, doc, labels=job)
            for f in shards:
                m.add_metric(f.labels, value(f))
            return m

        def gauge(name: str, doc: str, value: Callable[[ShardFigures], float]):
            m = GaugeMetricFamily(name, doc, labels=job)
            for f in shards:
                m.add_metric(f.labels, value(f))
            return m

        yield counter(
            "elasticd_ps_bytes_received", "Tensor bytes received", lambda f: f.stats.bytes_in
        )
        yield counter("elasticd_ps_bytes_sent", "Tensor bytes sent", lambda f: f.stats.bytes_out)
        yield counter("elasticd_ps_pulls", "Pulls served", lambda f: f.stats.pulls)
        yield counter(
            "elasticd_ps_pushes_applied", "Pushes applied", lambda f: f.stats.pushes_applied
        )
        rejected = CounterMetricFamily(
            "elasticd_ps_pushes_rejected",
            "Pushes not applied, by reason",
            labels=[*job, "reason"],
        )
        for f in shards:
            for reason in sorted({*REJECT_REASONS, *f.stats.pushes_rejected}):
                rejected.add_metric([*f.labels, reason], f.stats.pushes_rejected.get(reason, 0))
        yield rejected
        for name, doc, pick in (
            (
                "elasticd_ps_push_staleness",
                "Versions between a push's base and the shard",
                lambda f: f.stats.staleness,
            ),
            (
                "elasticd_ps_optimizer_step_seconds",
                "Seconds per optimizer step",
                lambda f: f.stats.step_seconds,
            ),
            (
                "elasticd_ps_snapshot_pause_seconds",
                "Seconds a snapshot held the shard's lock (pushes waited)",
                lambda f: f.stats.pause_seconds,
            ),
        ):
            h = HistogramMetricFamily(name, doc, labels=job)
            for f in shards:
                hist = pick(f)
                h.add_metric(f.labels, hist.cumulative(), hist.sum)
            yield h
        yield gauge("elasticd_ps_shard_version", "Updates applied", lambda f: f.version)
        yield gauge(
            "elasticd_ps_shard_generation", "Newest generation seen", lambda f: f.generation
        )
        yield gauge("elasticd_ps_shard_bytes", "Parameter bytes held", lambda f: f.nbytes)
        unknown = CounterMetricFamily(
            "elasticd_ps_unknown_job_requests", "Requests naming a job this PS does not hold"
        )
        unknown.add_metric([], self._unknown_jobs())
        yield unknown


def new_registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
