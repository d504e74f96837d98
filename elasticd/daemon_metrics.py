"""Prometheus metrics of the controller and the agents (the PS has its own:
:mod:`elasticd.server.ps.metrics`), served with ``--metrics-port``.

Everything is read at scrape time from what the daemon already holds; nothing
is counted twice and nothing goes through etcd. The endpoint is plain HTTP
without credentials, so it listens on loopback (``--metrics-host``, default
127.0.0.1) whatever address the daemon's gRPC port listens on. Workers' figures (step, loss,
samples/s) reach the controller in their progress reports over gRPC, and the
controller's metrics show them.

Controller (job metrics only on the leader, so that a standby does not
report the same jobs twice):

- ``elasticd_controller_leader``: 1 on the leader
- ``elasticd_controller_reconciles_total``
- ``elasticd_jobs{state}``: jobs the cluster knows, by state
- per running job (label ``job``): ``elasticd_job_step``,
  ``elasticd_job_total_steps``, ``elasticd_job_loss``,
  ``elasticd_job_samples_per_second``, ``elasticd_job_steps_per_second``,
  ``elasticd_job_generation``, ``elasticd_job_workers``,
  ``elasticd_job_restarts``, ``elasticd_job_checkpoint_step``,
  ``elasticd_job_updates_lost``, ``elasticd_job_step_seconds`` (time per step, from
  the steps/s of the reports)
- per job, since this controller leads: ``elasticd_job_recoveries_total`` and the
  histogram ``elasticd_job_recovery_seconds`` (from the pass that sees a member
  gone to the first report of the next generation), ``elasticd_job_checkpoints_total``,
  ``elasticd_job_checkpoint_bytes_total`` and the histogram
  ``elasticd_job_checkpoint_seconds`` (checkpoints the controller ordered from the PS)

Agent (label ``node``):

- ``elasticd_agent_slots``
- ``elasticd_agent_processes{state}``: training processes by state
- ``elasticd_agent_process_restarts``: restarts of the processes it holds now
- ``elasticd_agent_warm_processes``: interpreters waiting, torch imported
- ``elasticd_agent_processes_restarted_total``: restarts since the agent started

Every daemon (label ``process``): ``elasticd_lease_keepalive_seconds`` (summary of
the round-trips of its etcd lease keepalives) and
``elasticd_lease_keepalive_last_seconds`` (the latest one).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

JOB_GAUGES = (
    ("step", "step", "Steps applied"),
    ("total_steps", "total_steps", "Steps the job runs"),
    ("loss", "loss", "Latest reported loss"),
    ("samples_per_second", "samples_per_s", "Samples trained per second"),
    ("steps_per_second", "steps_per_s", "Steps per second"),
    ("generation", "generation", "Sealed membership generation"),
    ("restarts", "restarts", "Training process restarts in this generation"),
    ("checkpoint_step", None, "Step of the newest checkpoint"),
    ("updates_lost", "updates_lost", "Applied updates lost to restores"),
)


METRICS_HOST = "127.0.0.1"  # metrics are plaintext and open: loopback unless told otherwise


def add_metrics_arguments(p) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0: any free port; "
        "default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default=METRICS_HOST,
        help="address the metrics listen on (default: 127.0.0.1, this host only, whatever "
        "--host says; 0.0.0.0 lets a Prometheus elsewhere scrape them, in plaintext "
        "and without credentials)",
    )


class _ReadAtScrape(Collector):
    def describe(self) -> list[Metric]:
        return []  # names are not checked up front: nothing is read at registration


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Serve ``registry`` on http://host:port/metrics in a daemon thread; returns the server.

    ``port`` 0 picks a free port (``server.server_port``). Stop with
    ``server.shutdown(); server.server_close()``.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


class ControllerCollector(_ReadAtScrape):
    def __init__(self, controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        from elasticd.server.controller.records import TERMINAL
        from elasticd.server.controller.status import status_message

        c = self.controller
        yield GaugeMetricFamily(
            "elasticd_controller_leader", "1 on the leader", value=int(c.is_leader)
        )
        yield CounterMetricFamily(
            "elasticd_controller_reconciles", "Reconcile passes run", value=c.reconciles
        )
        states: Counter[str] = Counter()
        gauges = {
            name: GaugeMetricFamily(f"elasticd_job_{name}", help_, labels=["job"])
            for name, _, help_ in JOB_GAUGES
        }
        workers = GaugeMetricFamily(
            "elasticd_job_workers", "Workers in the generation", labels=["job"]
        )
        step_s = GaugeMetricFamily(
            "elasticd_job_step_seconds", "Seconds per step (0: not stepping)", labels=["job"]
        )
        figures = JobFigureMetrics()
        for job_id in c.job_ids():
            try:
                record = c.snapshot(job_id).record
                states[record.state] += 1
                if not c.is_leader or record.state in TERMINAL:
                    continue  # an ended job's status is not built at every scrape
                status = status_message(c, job_id)
            except KeyError:  # gone since the listing
                continue
            for name, field, _ in JOB_GAUGES:
                value = record.checkpoint_step if field is None else getattr(status, field)
                gauges[name].add_metric([job_id], float(value))
            workers.add_metric([job_id], len(status.workers))
            step_s.add_metric([job_id], 1 / status.steps_per_s if status.steps_per_s > 0 else 0)
            figures.add(job_id, c.figures.of(job_id))
        jobs = GaugeMetricFamily("elasticd_jobs", "Jobs by state", labels=["state"])
        for state, n in sorted(states.items()):
            jobs.add_metric([state], n)
        yield jobs
        yield from gauges.values()
        yield workers
        yield step_s
        yield from figures.families()


# (name, help, kind, field of JobCounts): the controller's recovery and checkpoint figures
JOB_FIGURES = (
    ("recoveries", "Recoveries from a lost or restarted member", CounterMetricFamily, "recoveries"),
    (
        "recovery_seconds",
        "Seconds from a lost or restarted member seen to its job's next report",
        HistogramMetricFamily,
        "recovery_seconds",
    ),
    ("checkpoints", "Checkpoints ordered and committed", CounterMetricFamily, "checkpoints"),
    (
        "checkpoint_bytes",
        "Bytes of the committed checkpoints",
        CounterMetricFamily,
        "checkpoint_bytes",
    ),
    (
        "checkpoint_seconds",
        "Seconds to write a checkpoint's shards and commit it",
        HistogramMetricFamily,
        "checkpoint_seconds",
    ),
)


class JobFigureMetrics:
    """The controller's recovery and checkpoint figures, one job at a time."""

    def __init__(self) -> None:
        self._families = [
            (kind(f"elasticd_job_{name}", help_, labels=["job"]), field)
            for name, help_, kind, field in JOB_FIGURES
        ]

    def add(self, job_id: str, counts) -> None:
        for family, field in self._families:
            figure = getattr(counts, field)
            if isinstance(family, HistogramMetricFamily):
                family.add_metric([job_id], figure.cumulative(), figure.sum)
            else:
                family.add_metric([job_id], figure)

    def families(self) -> Iterator[Metric]:
        for family, _ in self._families:
            yield family


class SessionCollector(_ReadAtScrape):
    """The round-trips of a daemon's etcd lease keepalives."""

    def __init__(self, session, process: str) -> None:
        self.session = session
        self.process = process

    def collect(self) -> Iterator[Metric]:
        count, total, last = self.session.keepalive_figures()
        s = SummaryMetricFamily(
            "elasticd_lease_keepalive_seconds",
            "Round-trips of the etcd lease keepalives",
            labels=["process"],
        )
        s.add_metric([self.process], count, total)
        yield s
        g = GaugeMetricFamily(
            "elasticd_lease_keepalive_last_seconds",
            "Round-trip of the latest etcd lease keepalive",
            labels=["process"],
        )
        g.add_metric([self.process], last)
        yield g


class AgentCollector(_ReadAtScrape):
    def __init__(self, agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        node = [a.node_id]
        slots = a.slots_snapshot()
        yield _gauge("elasticd_agent_slots", "Slots of this node", node, a.slots)
        by_state = GaugeMetricFamily(
            "elasticd_agent_processes", "Training processes by state", labels=["node", "state"]
        )
        for state, n in sorted(Counter(s.state for s in slots).items()):
            by_state.add_metric([a.node_id, state], n)
        yield by_state
        yield _gauge(
            "elasticd_agent_process_restarts",
            "Restarts of the training processes this node holds",
            node,
            sum(s.restarts for s in slots),
        )
        yield _gauge(
            "elasticd_agent_warm_processes",
            "Interpreters waiting for an assignment, torch imported",
            node,
            len(a.supervisor.warm_pids()),
        )
        restarted = CounterMetricFamily(
            "elasticd_agent_processes_restarted",
            "Training processes restarted since the agent started",
            labels=["node"],
        )
        restarted.add_metric(node, a.restarts_total)
        yield restarted
        yield from SessionCollector(a.session, f"agent:{a.node_id}").collect()


def _gauge(name: str, help_: str, node: list[str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_, labels=["node"])
    g.add_metric(node, value)
    return g


def start_metrics(args, collector: Collector, process: str, *more: Collector):
    """Serve ``collector`` (and ``more``) when the daemon was given ``--metrics-port``;
    None otherwise."""
    if getattr(args, "metrics_port", None) is None:
        return None
    registry = CollectorRegistry()
    for each in (collector, *more):
        registry.register(each)
    host = getattr(args, "metrics_host", None) or METRICS_HOST
    server = serve_metrics(registry, host, args.metrics_port)
    log.info(
        "event=metrics_ready process=%s url=http://%s:%d/metrics",
        process, host, server.server_port,
    )  # fmt: skip
    return server


def stop_metrics(server) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
