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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasticd.retry import wait_until
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.security.config import Security
from elasticd.server.ps.messages import SERVICE
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
