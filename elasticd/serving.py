"""Running a process: gRPC servers on explicit limits, logging, and shutdown on signals."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from elasticd.logs import configure_logging  # noqa: F401  (re-exported)
from elasticd.rpc.limits import GRPC_OPTIONS
from elasticd.security.channels import server_credentials
from elasticd.security.config import Security, current
from elasticd.security.gate import Gate

log = logging.getLogger(__name__)

GRPC_THREADS = 32  # handler threads per server: one per concurrent stream
# gRPC sets SO_REUSEPORT by default: a second server given a port another process
# listens on would start, and the kernel would split the port's connections
# between the two. A daemon given a port in use (a fixed --port, the port its
# probes and firewall rules name) must fail instead.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


def start_grpc_server(
    add_servicers: Callable[[grpc.Server], None],
    host: str,
    port: int,
    services: Sequence[str] = (),
    security: Security | None = None,
    gate: Gate | None = None,
) -> tuple[grpc.Server, int]:
    """Serve ``services`` (full names, for health checking and reflection) on host:port.

    TLS when ``security`` names a certificate; ``gate`` (default: one built from
    ``security``) checks every call, unless nothing is configured to check.
    """
    security = current() if security is None else security
    if gate is None and (security.members_checked or security.tokens_file):
        gate = Gate(security)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix="grpc"),
        options=[*GRPC_OPTIONS, *EXCLUSIVE_PORT],
        interceptors=[gate] if gate is not None else None,
    )
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    credentials = server_credentials(security)
    address = f"{host}:{port}"
    try:  # grpc reports a failed bind by returning 0 or, in newer releases, raising
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the port is in use or the address not local")
    server.start()
    return server, bound


def service_name(module, name: str) -> str:
    """The full name of service ``name`` in a generated ``*_pb2`` module."""
    return module.DESCRIPTOR.services_by_name[name].full_name


class StopSignal(threading.Event):
    """Set by SIGTERM or SIGINT.

    Python runs a signal's handler in the main thread, but the kernel may deliver
    the signal to any thread, gRPC's included; then it only flags the handler,
    which runs the next time the main thread runs Python code. A main thread
    blocked in a plain ``Event.wait()`` never does, and the daemon ignores its
    SIGTERM. So the main thread's untimed wait wakes every ``POLL_S`` to let the
    handler run.
    """

    POLL_S = 0.2

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the signal comes (to wake a loop that sleeps on its own event)."""
        self._callbacks.append(callback)

    def set(self) -> None:
        super().set()
        for callback in list(self._callbacks):
            callback()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None or threading.current_thread() is not threading.main_thread():
            return super().wait(timeout)
        while not super().wait(self.POLL_S):
            pass
        return True


def wait_for_stop_signal() -> StopSignal:
    """An event set on SIGTERM or SIGINT (install from the main thread)."""
    stop = StopSignal()

    def handler(signum, _frame):
        log.info("event=signal signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def exit_without_teardown(code: int) -> None:
    """End a daemon whose own shutdown is done, skipping the interpreter's.

    By then the daemon has stopped its servers, revoked its lease and closed its
    clients. What the interpreter would still do is tear down torch and gRPC's
    modules, which took 1.7 s of a parameter server's 1.8 s stop here: time
    that a systemd stop, a drain or a restart spends waiting for nothing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
