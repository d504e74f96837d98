"""What anyone who reaches a port may do without credentials cannot wear a daemon down.

- Health and reflection streams are open, and each holds a handler thread while
  it lasts: they run under their own limit, so a flood of them leaves the
  threads the other RPCs need.
- Metrics (plain HTTP, no credentials) listen on loopback unless told otherwise.
- The tokens file is the controller's alone, and it is the truth: removed or
  broken, it revokes every token; a PS and an agent start, and never open it,
  when it does not exist.
"""

from __future__ import annotations

import argparse
import socket
import urllib.error
import urllib.request

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasticd.daemon_metrics import add_metrics_arguments, start_metrics, stop_metrics
from elasticd.retry import wait_until
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.security.config import Security
from elasticd.server.ps.messages import SERVICE
from elasticd.server.ps.metrics import PSCollector
from elasticd.server.ps.service import ParameterServerServicer, add_to_server
from elasticd.serving import GRPC_THREADS, OPEN_STREAMS, start_grpc_server

# -- open streams ------------------------------------------------------------


def test_open_streams_past_their_limit_are_refused_and_rpcs_are_still_served():
    servicer = ParameterServerServicer("ps-open")
    server, port = start_grpc_server(
        lambda s: add_to_server(servicer, s), "127.0.0.1", 0, [SERVICE.full_name], Security()
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    watches = []
    try:
        health = health_pb2_grpc.HealthStub(channel)
        # More streams than the server has threads: each admitted one holds a thread.
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            for _ in range(GRPC_THREADS + 8)
        ]
        served, refused = [], []
        for call in watches:
            try:
                assert next(call).status == health_pb2.HealthCheckResponse.SERVING
                served.append(call)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "health and reflection streams" in exc.details()
                refused.append(call)
        assert (len(served), len(refused)) == (OPEN_STREAMS, GRPC_THREADS + 8 - OPEN_STREAMS)

        # Ordinary RPCs and probes are still served while the streams stay open.
        reply = ps_pb2_grpc.ParameterServerStub(channel).Stats(ps_pb2.StatsRequest(), timeout=10)
        assert reply.ps_id == "ps-open"
        check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert all(call.is_active() for call in served)

        # A stream that ends gives its place back.
        for call in served:
            call.cancel()

        def one_more():
            call = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            try:
                return next(call).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False
            finally:
                call.cancel()

        wait_until(one_more, 30, "a Watch stream served once the others ended")
    finally:
        for call in watches:
            call.cancel()
        channel.close()
        server.stop(grace=0).wait()
        servicer.close()


# -- metrics -------------------------------------------------------------------


def _metrics_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="0.0.0.0")  # the daemon's gRPC address
    add_metrics_arguments(p)
    return p.parse_args(["--metrics-port", "0", *argv])


def _outside_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def _scrape(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_metrics_listen_on_loopback_unless_told_otherwise():
    servicer = ParameterServerServicer("ps-metrics")
    collector = PSCollector(servicer.figures, lambda: 0)
    outside = _outside_address()

    # A daemon serving gRPC on every address still keeps its metrics on loopback.
    server = start_metrics(_metrics_args(), collector, "ps:test")
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert _scrape("127.0.0.1", server.server_port)
        if outside is not None:
            assert not _scrape(outside, server.server_port)
    finally:
        stop_metrics(server)

    # --metrics-host opens them to the network the operator names.
    server = start_metrics(_metrics_args("--metrics-host", "0.0.0.0"), collector, "ps:test")
    try:
        assert server.server_address[0] == "0.0.0.0"
        if outside is not None:
            assert _scrape(outside, server.server_port)
    finally:
        stop_metrics(server)
    servicer.close()
