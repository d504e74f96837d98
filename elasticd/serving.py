"""Running a process: gRPC servers on explicit limits, logging, and shutdown on signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from concurrent import futures

import grpc

from elasticd.rpc.limits import GRPC_OPTIONS

log = logging.getLogger(__name__)

GRPC_THREADS = 32  # handler threads per server: one per concurrent stream


def start_grpc_server(
    add_servicers: Callable[[grpc.Server], None], host: str, port: int
) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix="grpc"),
        options=GRPC_OPTIONS,
    )
    add_servicers(server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


def advertised_host(host: str) -> str:
    """The address others should dial for a server listening on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host


def configure_logging(process: str, level: str | None = None) -> None:
    """One line per event: time, level, process, then key=value fields."""
    logging.basicConfig(
        level=(level or os.environ.get("ELASTICD_LOG_LEVEL", "INFO")).upper(),
        format=f"%(asctime)s %(levelname)s process={process} pid=%(process)d %(name)s %(message)s",
        stream=sys.stderr,
    )


def wait_for_stop_signal() -> threading.Event:
    """An event set on SIGTERM or SIGINT (main thread only)."""
    stop = threading.Event()

    def handler(signum, _frame):
        log.info("event=signal signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
