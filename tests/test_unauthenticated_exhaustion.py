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
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasticd.daemon_metrics import add_metrics_arguments, start_metrics, stop_metrics
from elasticd.retry import wait_until
from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.security.config import Security
from elasticd.security.local_pki import make_local_pki
from elasticd.security.tokens import Identity, TokenBook
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


# -- the tokens file -------------------------------------------------------------


def _write_tokens(path: Path, tokens: dict[str, str]) -> None:
    entries = [{"name": name, "role": "submit", "token": t} for name, t in tokens.items()]
    path.write_text(yaml.safe_dump({"tokens": entries}))


def test_a_removed_or_corrupt_tokens_file_revokes_every_token_until_restored(tmp_path):
    path = tmp_path / "tokens.yaml"
    book = TokenBook(str(path))  # missing at start: nothing is accepted, nothing crashes
    assert book.identify("alice-token") is None

    _write_tokens(path, {"alice": "alice-token", "bob": "bob-token"})
    assert book.identify("alice-token") == Identity("alice", "submit")
    assert book.identify("bob-token") == Identity("bob", "submit")

    path.unlink()  # removed: everyone is revoked, not kept from the last good copy
    assert book.identify("alice-token") is None and book.identify("bob-token") is None

    _write_tokens(path, {"alice": "alice-token"})  # restored (without bob)
    assert book.identify("alice-token") == Identity("alice", "submit")
    assert book.identify("bob-token") is None

    for corrupt in ("tokens: [{name: alice, role: submit, token:", "tokens: 7", "\x00\xff"):
        path.write_text(corrupt)
        assert book.identify("alice-token") is None, corrupt
        _write_tokens(path, {"alice": "alice-token"})
        assert book.identify("alice-token") == Identity("alice", "submit")

    path.chmod(0o000)  # unreadable (root reads it anyway: then it is simply valid)
    try:
        readable = _readable(path)
        assert (book.identify("alice-token") is not None) == readable
    finally:
        path.chmod(0o600)


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False


# A daemon run under this hook exits 99 the moment it opens the tokens file.
NEVER_OPENS = """
import os, runpy, sys
watched = os.path.realpath(sys.argv.pop(1))
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.realpath(os.fsdecode(args[0])) == watched:
            sys.stderr.write("opened the tokens file\\n"); sys.stderr.flush(); os._exit(99)
sys.addaudithook(hook)
sys.argv[0] = "elasticd"
runpy.run_module("elasticd", run_name="__main__")
"""


@pytest.mark.slow
def test_a_ps_and_an_agent_start_without_the_tokens_file_and_never_open_it(etcd, prefix, tmp_path):
    pki = make_local_pki(tmp_path / "tls", etcd=False)
    settings = yaml.safe_load(pki.config("controller").read_text())  # it names a tokens file
    missing = pki.directory / "no-such-tokens.yaml"
    settings["tokens_file"] = missing.name
    config = pki.directory / "daemons.yaml"
    config.write_text(yaml.safe_dump(settings))
    common = ["--etcd", etcd.endpoint, "--prefix", prefix, "--config", str(config)]
    daemons = {
        "ps": ["ps", *common, "--id", "ps-nt", "--host", "0.0.0.0", "--metrics-port", "0"],
        "agent": ["agent", *common, "--node-id", "n-nt", "--host", "127.0.0.1"],
    }
    procs = {}
    try:
        for name, argv in daemons.items():
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", NEVER_OPENS, str(missing), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
            )
        for name, ready in (("ps", "ps ps-nt listening on"), ("agent", "agent n-nt ready")):
            line = procs[name].stdout.readline()
            assert ready in line, (name, line, procs[name].poll())

        # The PS serves members (mutual TLS) on every address, its metrics on loopback only.
        ps = psutil.Process(procs["ps"].pid)
        wait_until(
            lambda: {ip for ip, _ in ps_listening(ps)} >= {"127.0.0.1"},
            30,
            "the PS's metrics listening",
        )
        listening = ps_listening(ps)
        assert {ip for ip, _ in listening} <= {"0.0.0.0", "::", "127.0.0.1"}, listening
        metrics = [port for ip, port in listening if ip == "127.0.0.1"]
        assert metrics and _scrape("127.0.0.1", metrics[0])
        grpc_port = next(port for ip, port in listening if ip in ("0.0.0.0", "::"))
        controller = pki.daemon("controller")  # Stats is the controller's (and other PS')
        with grpc.secure_channel(
            f"127.0.0.1:{grpc_port}",
            grpc.ssl_channel_credentials(
                Path(controller.tls_ca).read_bytes(),
                Path(controller.tls_key).read_bytes(),
                Path(controller.tls_cert).read_bytes(),
            ),
        ) as channel:
            reply = ps_pb2_grpc.ParameterServerStub(channel).Stats(
                ps_pb2.StatsRequest(), timeout=10
            )
        assert reply.ps_id == "ps-nt"
        for proc in procs.values():
            assert proc.poll() is None
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        errors = {name: proc.communicate(timeout=60)[1] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert "opened the tokens file" not in errors[name], name
        assert proc.returncode == 0, (name, errors[name][-3000:])


def ps_listening(ps: psutil.Process) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in ps.net_connections() if c.status == "LISTEN"}
