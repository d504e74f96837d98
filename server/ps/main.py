"""`elasticd ps`: serve parameter shards and register in etcd."""

from __future__ import annotations

import argparse
import json
import logging
import threading
import uuid

from elasticd.addresses import add_advertise_argument, advertised_host
from elasticd.coord.etcd import EtcdClient
from elasticd.coord.keys import DEFAULT_PREFIX, Keys
from elasticd.coord.session import DEFAULT_TTL_S, Session
from elasticd.daemon_metrics import add_metrics_arguments
from elasticd.logs import add_logging_arguments
from elasticd.sd_notify import Notifier
from elasticd.security import add_security_arguments
from elasticd.security.config import configure_daemon
from elasticd.serving import configure_logging, start_grpc_server, wait_for_stop_signal

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints, host:port[,host:port]")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix of this cluster")
    p.add_argument("--id", dest="ps_id", default=None, help="PS id (default: random)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    add_advertise_argument(p)
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    p.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S, help="etcd lease TTL, seconds")
    add_metrics_arguments(p)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for optimizer steps (default 1: a step is bound by "
        "memory bandwidth, and idle OpenMP threads spin on CPUs that gRPC needs)",
    )
    p.add_argument(
        "--sync-timeout",
        type=float,
        default=None,
        help="seconds a synchronous push (max_staleness 0) waits for the rest of its round "
        "before it is refused (default: shard.SYNC_ROUND_TIMEOUT_S, 30)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="on SIGTERM, how long the controller gets to move this PS's groups to other "
        "PS before it exits anyway (default: server/ps/drain.py DRAIN_TIMEOUT_S, 60)",
    )
    add_security_arguments(p)
    add_logging_arguments(p)


def run(args: argparse.Namespace) -> int:
    configure_daemon(args, args.host, "ps")  # before anything slow: an unsafe setting exits now
    notifier = Notifier.from_environment()
    import torch

    from elasticd.daemon_metrics import SessionCollector
    from elasticd.optimizers import warm_up_optimizers
    from elasticd.server.ps.messages import SERVICE
    from elasticd.server.ps.metrics import serve_metrics
    from elasticd.server.ps.service import ParameterServerServicer, add_to_server
    from elasticd.server.ps.shard import SYNC_ROUND_TIMEOUT_S
    from elasticd.wire import retain_chunk_memory

    torch.set_num_threads(max(args.torch_threads, 1))
    retain_chunk_memory()
    ps_id = args.ps_id or f"ps-{uuid.uuid4().hex[:8]}"
    configure_logging(f"ps:{ps_id}", fmt=args.log_format)
    stop = wait_for_stop_signal()
    sync_timeout = SYNC_ROUND_TIMEOUT_S if args.sync_timeout is None else args.sync_timeout
    servicer = ParameterServerServicer(ps_id, sync_timeout_s=sync_timeout, host=args.host)
    server, port = start_grpc_server(
        lambda s: add_to_server(servicer, s),
        args.host,
        args.port,
        [SERVICE.full_name],
    )
    host = advertised_host(args.host, args.advertise, args.etcd)
    address = f"{host}:{port}"
    metrics = None
    if args.metrics_port is not None:
        metrics = serve_metrics(servicer.registry, args.metrics_host, args.metrics_port)
        log.info(
            "event=metrics_ready ps=%s url=http://%s:%d/metrics",
            ps_id,
            args.metrics_host,
            metrics.server_port,
        )
    keys = Keys(args.prefix)
    client = EtcdClient(args.etcd)
    session = Session(client, ttl=args.lease_ttl, name=ps_id).start()
    servicer.registry.register(SessionCollector(session, f"ps:{ps_id}"))
    # The boot id tells the controller and workers that a PS with this id restarted
    # (and so holds none of the slices placed on it before).
    registration = {"ps_id": ps_id, "address": address, "incarnation": servicer.incarnation}
    session.put(keys.ps(ps_id), json.dumps(registration).encode())
    log.info("event=ps_ready ps=%s address=%s incarnation=%s", ps_id, address, servicer.incarnation)
    print(f"ps {ps_id} listening on {address}", flush=True)
    notifier.ready(f"ps {ps_id} serving on {address}", session.alive)
    # In the background: the first InitShard would otherwise pay for it.
    threading.Thread(target=warm_up_optimizers, name="warm-up", daemon=True).start()
    stop.wait()
    notifier.stopping()
    from elasticd.server.ps.drain import DRAIN_TIMEOUT_S, drain

    timeout = DRAIN_TIMEOUT_S if args.drain_timeout is None else args.drain_timeout
    drain(ps_id, session, client, keys, registration, lambda: len(servicer.shards.items()), timeout)
    session.close()
    server.stop(grace=2).wait()
    servicer.close()
    if metrics is not None:
        metrics.shutdown()
        metrics.server_close()
    client.close()
    return 0
