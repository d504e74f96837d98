"""`elasticd controller`: the job service, elected through etcd."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from elasticd.addresses import add_advertise_argument, advertised_host
from elasticd.coord.election import Election
from elasticd.coord.etcd import EtcdClient
from elasticd.coord.keys import DEFAULT_PREFIX, Keys
from elasticd.coord.session import DEFAULT_TTL_S, Session
from elasticd.daemon_metrics import (
    ControllerCollector,
    SessionCollector,
    add_metrics_arguments,
    start_metrics,
    stop_metrics,
)
from elasticd.logs import add_logging_arguments
from elasticd.retry import Backoff
from elasticd.sd_notify import Notifier
from elasticd.security import Gate, add_security_arguments
from elasticd.security.config import configure_daemon
from elasticd.security.confinement import ConfinementError, RunAs
from elasticd.security.storage import storage_policy
from elasticd.server.controller.join_window import JOIN_WINDOW_S
from elasticd.serving import (
    configure_logging,
    service_name,
    start_grpc_server,
    wait_for_stop_signal,
)
from elasticd.shape_probe.limits import MIN_MEMORY_MIB, PROBE_MEMORY_MIB, PROBE_TIMEOUT_S

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints, host:port[,host:port]")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix of this cluster")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    add_advertise_argument(p)
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    p.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S, help="etcd lease TTL, seconds")
    p.add_argument(
        "--checkpoint-url",
        default=os.path.abspath(".elasticd/checkpoints"),
        help="where checkpoints go when a job spec names no checkpoint.url (fsspec URL or path)",
    )
    p.add_argument(
        "--startup-grace",
        type=float,
        default=None,
        help="seconds a new leader's restores wait for the PS that held a job before restoring "
        "onto fewer (default: twice the lease TTL, at least 10)",
    )
    p.add_argument(
        "--join-window",
        type=float,
        default=JOIN_WINDOW_S,
        help="seconds a join must hold before it is sealed (gathers a burst of joins into one "
        "generation; departures never wait)",
    )
    p.add_argument(
        "--tokens-file",
        default=None,
        help="YAML file of JobService tokens, each with a name and a role (admin, submit, "
        "read); env ELASTICD_TOKENS_FILE. Without it, whoever reaches the port is admin",
    )
    p.add_argument(
        "--probe-timeout",
        type=_positive_seconds,
        default=PROBE_TIMEOUT_S,
        help="seconds a submitted task may take to import and build its model in the task "
        f"probe, a sandboxed process (default {PROBE_TIMEOUT_S:g}); longer: refused at submit",
    )
    p.add_argument(
        "--probe-memory",
        type=_probe_memory,
        default=PROBE_MEMORY_MIB,
        help="address space, MiB, of the task probe that builds a submitted task's model, torch "
        f"included (default {PROBE_MEMORY_MIB}, at least {MIN_MEMORY_MIB}); more: refused at submit",
    )
    p.add_argument(
        "--probe-run-as",
        default=None,
        metavar="USER",
        help="run the task probe (which imports submitted tasks) as this unprivileged user, "
        "its own group and no others; best one that runs nothing else, as the probe's "
        "process limit counts every process of that user (needs a controller run as root)",
    )
    add_metrics_arguments(p)
    add_security_arguments(p)
    add_logging_arguments(p)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _probe_memory(text: str) -> int:
    value = int(text)
    if value < MIN_MEMORY_MIB:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_MEMORY_MIB} MiB (torch itself needs ~600), got {text}"
        )
    return value


def probe_user(name: str | None) -> RunAs | None:
    """The --probe-run-as user; exits with the reason if it cannot be one."""
    if not name:
        return None
    try:
        run_as = RunAs.named(name)
    except ConfinementError as exc:
        print(f"elasticd controller: --probe-run-as: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if os.geteuid() != 0:
        print("elasticd controller: --probe-run-as needs a controller run as root", file=sys.stderr)
        raise SystemExit(2)
    return run_as


LEAD_RETRY_S = (0.1, 2.0)  # backoff after a failed pass of the leader loop: first, longest


def lead(controller, election: Election, stop: threading.Event) -> None:
    """Reconcile while leading; stand by otherwise. Never dies.

    Any error in a pass (etcd unreachable, a bug) is logged and the pass is
    tried again after a backoff: a leader whose loop had died would keep its
    election key alive through its session and never reconcile again.
    """
    backoff = Backoff(*LEAD_RETRY_S)
    while not stop.is_set():
        try:
            leader = election.is_leader()
            controller.set_leader(leader)
            if leader:
                controller.reconcile()
                controller.wait()
            else:
                election.wait_for_change(timeout=0.5)
            backoff.reset()
        except Exception:
            log.exception("event=leader_loop_error")
            try:
                controller.set_leader(False)
            except Exception:
                log.exception("event=leader_loop_error")
            stop.wait(backoff.next_delay())


def run(args: argparse.Namespace) -> int:
    security = configure_daemon(args, args.host, "controller", needs_tokens=True)
    notifier = Notifier.from_environment()
    # Imported here: `elasticd --help` and the other roles need no torch.
    from elasticd.rpc import job_pb2, job_pb2_grpc
    from elasticd.server.controller.controller import Controller
    from elasticd.server.controller.service import (
        JobServiceServicer,
        TrainingCoordinatorServicer,
    )
    from elasticd.shape_probe.client import ShapeProbe

    configure_logging("controller", fmt=args.log_format)
    stop = wait_for_stop_signal()
    keys = Keys(args.prefix)
    client = EtcdClient(args.etcd)
    controller = Controller(
        client,
        keys,
        "",
        args.checkpoint_url,
        join_window_s=args.join_window,
        lease_ttl_s=args.lease_ttl,
        startup_grace_s=args.startup_grace,
        probe=ShapeProbe(args.probe_timeout, args.probe_memory, probe_user(args.probe_run_as)),
        storage=storage_policy(
            security.allowed_storage, bool(security.tokens_file), args.checkpoint_url
        ),
    )

    def add(server) -> None:
        job_pb2_grpc.add_JobServiceServicer_to_server(JobServiceServicer(controller), server)
        job_pb2_grpc.add_TrainingCoordinatorServicer_to_server(
            TrainingCoordinatorServicer(controller), server
        )

    gate = Gate(security, owner_of=controller.owner_of)
    services = [service_name(job_pb2, n) for n in ("JobService", "TrainingCoordinator")]
    server, port = start_grpc_server(add, args.host, args.port, services, security, gate)
    controller.address = f"{advertised_host(args.host, args.advertise, args.etcd)}:{port}"
    controller.start()
    session = Session(client, ttl=args.lease_ttl, name="controller").start()
    election = Election(session, keys.election, controller.address.encode()).start()
    controller.election = election
    log.info("event=controller_ready address=%s", controller.address)
    print(f"controller listening on {controller.address}", flush=True)
    loop = threading.Thread(target=lead, args=(controller, election, stop), daemon=True)
    loop.start()
    metrics = start_metrics(
        args, ControllerCollector(controller), "controller", SessionCollector(session, "controller")
    )
    notifier.ready(f"controller serving on {controller.address}", session.alive)
    stop.wait()
    notifier.stopping()
    controller.set_leader(False)
    loop.join(timeout=5)
    election.resign()
    session.close()
    controller.stop()
    server.stop(grace=2).wait()
    stop_metrics(metrics)
    client.close()
    return 0
