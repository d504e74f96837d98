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
from elasticd.security.gate import OPEN_SERVICES, Gate

log = logging.getLogger(__name__)

GRPC_THREADS = 32  # handler threads per server: one per concurrent stream
# Streams of the open services (health Watch, reflection) served at once. They need
# no credentials and each holds a handler thread while it is open, so they get
# their own share of GRPC_THREADS: past it a new one is refused RESOURCE_EXHAUSTED,
# and the other GRPC_THREADS - OPEN_STREAMS threads stay for the RPCs that do.
# Unary health checks (probes) are not counted: they return at once.
OPEN_STREAMS = 8
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
    open_streams: int = OPEN_STREAMS,
) -> tuple[grpc.Server, int]:
    """Serve ``services`` (full names, for health checking and reflection) on host:port.

    TLS when ``security`` names a certificate; ``gate`` (default: one built from
    ``security``) checks every call, unless nothing is configured to check. At most
    ``open_streams`` health and reflection streams are served at once.
    """
    security = current() if security is None else security
    if gate is None and (security.members_checked or security.tokens_file):
        gate = Gate(security)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix="grpc"),
        options=[*GRPC_OPTIONS, *EXCLUSIVE_PORT],
        interceptors=[OpenStreamLimit(open_streams), *([gate] if gate is not None else [])],
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


class OpenStreamLimit(grpc.ServerInterceptor):
    """Serves at most ``limit`` streams of the open services at once; refuses the rest.

    A stream holds its handler thread until it ends, so without a limit anyone who
    can reach the port could hold every thread with health Watch streams, and no
    RPC would be served: the open services are open, never unlimited.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if handler is None or service not in OPEN_SERVICES:
            return handler
        streams = handler.unary_stream or handler.stream_stream
        if streams is None:
            return handler  # unary: answered at once
        method = handler_call_details.method

        def limited(request, context):
            if not self._slots.acquire(blocking=False):
                log.info("event=open_stream_refused method=%s peer=%s", method, context.peer())
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{method}: {self.limit} health and reflection streams are open on this "
                    "server already; try again once one ends (unary Check is always served)",
                )
            try:
                yield from streams(request, context)
            finally:
                self._slots.release()

        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return make(limited, handler.request_deserializer, handler.response_serializer)


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
