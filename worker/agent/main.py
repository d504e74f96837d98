"""`elasticd agent`: one per node; runs the training processes assigned to it."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from elasticd.addresses import add_advertise_argument, advertised_host
from elasticd.coord.etcd import EtcdClient
from elasticd.coord.keys import DEFAULT_PREFIX, Keys
from elasticd.coord.session import DEFAULT_TTL_S
from elasticd.daemon_metrics import (
    AgentCollector,
    add_metrics_arguments,
    start_metrics,
    stop_metrics,
)
from elasticd.logs import add_logging_arguments
from elasticd.sd_notify import Notifier
from elasticd.security import add_security_arguments
from elasticd.security.config import Security, configure_daemon
from elasticd.security.confinement import ConfinementError, RunAs, training_environment
from elasticd.serving import configure_logging, wait_for_stop_signal
from elasticd.worker.agent.agent import NodeAgent
from elasticd.worker.agent.drain_request import add_drain_arguments, request_drain
from elasticd.worker.agent.node_drain import DRAIN_TIMEOUT_S, drain
from elasticd.worker.agent.registration import default_node_id
from elasticd.worker.agent.sandbox import WORK_SUBDIR, Sandbox, SandboxError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints, host:port[,host:port]")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix of this cluster")
    p.add_argument("--node-id", default=None, help="node id (default: <hostname>-<pid>)")
    p.add_argument("--slots", type=int, default=1, help="training processes this node runs at once")
    p.add_argument("--host", default="", help="address to listen on (default: the hostname)")
    add_advertise_argument(p)
    p.add_argument(
        "--port",
        type=int,
        default=0,
        help="port of the NodeAgent gRPC service (0: any free port; a fixed one lets "
        "health probes and firewall rules name it)",
    )
    p.add_argument(
        "--warm",
        type=int,
        default=None,
        help="training interpreters kept started in advance, torch imported, so a restart "
        "skips start-up (default: one per slot; 0: none)",
    )
    p.add_argument(
        "--allow-chaos",
        action="store_true",
        help="serve InjectFault, through which `elasticd chaos` SIGKILLs or SIGSTOPs this "
        "agent or a training process it supervises (off by default; for test clusters)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT_S,
        help="on SIGTERM or a drain request, how long the controller gets to take this "
        "node's workers out of their jobs before they are stopped anyway, seconds "
        "(keep it below the service manager's stop timeout)",
    )
    add_drain_arguments(p)
    p.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S, help="etcd lease TTL, seconds")
    p.add_argument(
        "--log-dir",
        default=os.path.abspath(".elasticd/logs"),
        help="directory for training process logs (<log-dir>/<job>/<worker>.log)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="where each job gets its working directory, <work-dir>/<job> (mode 0700, the "
        "--run-as user's); the run-as user must be able to traverse its parents "
        "(default: <log-dir>/.work, writable wherever the logs are)",
    )
    p.add_argument(
        "--run-as",
        default=None,
        metavar="USER",
        help="run training processes as this unprivileged user, with its own group and no "
        "others (an agent run as root without it logs a warning: user code would run as root)",
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME",
        help="also pass the agent's variable NAME to training processes (repeatable; e.g. "
        "AWS_ACCESS_KEY_ID). By default they get only locale, time zone, PATH, thread, "
        "device and NCCL/gloo variables, and of the security settings the CA, the server "
        "name and the job certificate; never a token, key or etcd credential",
    )
    add_metrics_arguments(p)
    add_security_arguments(p)
    add_logging_arguments(p)


def make_sandbox(args: argparse.Namespace, security: Security) -> Sandbox:
    """What the agent's training processes get: environment, user, work directory."""
    run_as = RunAs.named(args.run_as) if args.run_as else None
    if run_as is not None and os.geteuid() != 0:
        raise SandboxError(f"--run-as {args.run_as}: the agent must run as root to do so")
    if run_as is None and os.geteuid() == 0:
        log.warning(
            "event=training_as_root detail=training processes run user code as root; "
            "pass --run-as USER to run them as an unprivileged user"
        )
    work_dir = args.work_dir or os.path.join(os.path.abspath(args.log_dir), WORK_SUBDIR)
    environment = training_environment(os.environ, security, args.worker_env, run_as)
    sandbox = Sandbox(environment, Path(work_dir).absolute(), run_as)
    sandbox.check_reachable()
    return sandbox


def run(args: argparse.Namespace) -> int:
    if args.drain:
        return request_drain(args)
    node_id = args.node_id or default_node_id()
    configure_logging(f"agent:{node_id}", fmt=args.log_format)
    host = args.host or socket.gethostname()
    security = configure_daemon(args, host, "agent")
    try:
        sandbox = make_sandbox(args, security)
    except (ConfinementError, OSError) as exc:
        print(f"elasticd agent: {exc}", file=sys.stderr)
        return 2
    notifier = Notifier.from_environment()  # before any training process is started
    stop = wait_for_stop_signal()
    agent = NodeAgent(
        EtcdClient(args.etcd),
        Keys(args.prefix),
        node_id,
        args.slots,
        args.log_dir,
        args.lease_ttl,
        address=advertised_host(host, args.advertise, args.etcd),
        host=host,
        port=args.port,
        warm=args.warm,
        allow_chaos=args.allow_chaos,
        sandbox=sandbox,
    ).start()
    stop.on_set(agent.wake)
    log.info(
        "event=agent_ready node=%s slots=%d allow_chaos=%s", node_id, args.slots, args.allow_chaos
    )
    print(f"agent {node_id} ready with {args.slots} slot(s)", flush=True)
    metrics = start_metrics(args, AgentCollector(agent), f"agent:{node_id}")
    notifier.ready(f"agent {node_id} with {args.slots} slot(s)", agent.session.alive)
    try:
        agent.run(stop)  # until SIGTERM or a drain request
        notifier.stopping()  # systemd's stop timeout (TimeoutStopSec) covers the drain
        drain(agent, args.drain_timeout)
    finally:
        notifier.stopping()
        agent.shutdown()
        stop_metrics(metrics)
    return 0
