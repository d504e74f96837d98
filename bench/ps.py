"""PS tier throughput: full pulls and pushes of a >= 64 MB model over 2 real PS processes.

``python -m bench ps [--json] [--scale 1] [--servers 2] [--reps 15] [--server-threads N] [--tls]``

Two parameter servers run in their own processes (the ParameterServer gRPC
service without etcd: etcd plays no part in the data path). The benchmark
process places a model of a few large float32 tensors on them with
``elasticd.placement.place`` and times, through ``PSTier`` exactly as a worker
uses it:

- ``pull_gbps``: a full pull of every parameter into the model's tensors;
- ``push_gbps``: a full push of a gradient of every parameter, applied by the
  PS (an SGD step on its shard) before the reply;
- ``small_rpc_per_s``: a push and a pull of a single 4 KB tensor, as pairs per second, and
  ``echo_rpc_per_s``: round trips of a bare grpcio unary method echoing 4 KB (its baseline);
  ``small_rpc_ratio = small_rpc_per_s / (echo_rpc_per_s / 2)`` (a pair is two round trips);
- ``replica_push_ratio``: push throughput of the same model placed with hot replicas
  (``ps.replicas: 2``: every update forwarded to a backup PS before the reply) over
  the push without;
- ``socket_gbps``: the same byte count sent over one raw loopback TCP
  connection to another process (``sendall`` from the tensor's memory,
  ``recv_into`` a preallocated buffer) — the baseline.

With ``--tls`` the servers and the client run as a cluster with mutual TLS
would (certificates made for the run): gRPC and the replication channel are
TLS, so ``replica_push_ratio`` shows what a hot replica costs when every byte
is encrypted; the echo and socket baselines stay plaintext.

Each figure is the median of ``--reps`` timed runs after one warm-up, in
gigabits per second, and ``ratio = min(pull, push) / socket``. Client, servers
and the socket sink share this machine's CPUs; socket, pull and push runs are
interleaved so background load falls on all three alike. ``*_cpu_*_s`` are
the CPU seconds one run costs each role (client, servers, socket sink): they
show what limits a figure when the wall clock alone cannot.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

SMALL_RPC_SECONDS = 3.0  # for each of the two, in total
SMALL_RPC_SLICES = 6
MODEL_SHAPES = ((8192, 1024), (4096, 1024), (2048, 1024), (2048, 1024))  # 64 MiB of float32


def _serve(ps_id: str, conn, threads: int, security=None) -> None:
    """A PS process: the gRPC service on a free loopback port until told to stop
    (TLS when ``security``, a :class:`elasticd.security.Security`, says so)."""
    from concurrent import futures

    import grpc

    from elasticd.rpc.limits import GRPC_OPTIONS
    from elasticd.security.channels import server_credentials
    from elasticd.security.config import use
    from elasticd.server.ps.service import ParameterServerServicer, add_to_server
    from elasticd.serving import GRPC_THREADS
    from elasticd.wire import retain_chunk_memory

    torch.set_num_threads(1)  # as `elasticd ps` does by default (--torch-threads)
    retain_chunk_memory()  # as `elasticd ps` does
    if security is not None:
        use(security)  # as `elasticd ps` does: its replication channel reads it
    servicer = ParameterServerServicer(ps_id)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads or GRPC_THREADS), options=GRPC_OPTIONS
    )
    add_to_server(servicer, server)
    if security is not None and security.tls_cert:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(security))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    conn.recv()  # anything: stop
    server.stop(None).wait()


def start_servers(
    ctx, n: int, threads: int | None, procs: list, pipes: list, security=None
) -> dict[str, str]:
    """``n`` PS processes (``_serve``); appends each to ``procs`` and ``pipes`` for
    :func:`stop_all`, and returns ps_id -> address."""
    addresses = {}
    for i in range(n):
        ps_id = f"ps-{i}"
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(ps_id, child, threads, security), daemon=True)
        proc.start()
        procs.append(proc)
        pipes.append(parent)
        addresses[ps_id] = f"127.0.0.1:{parent.recv()}"
    return addresses


def stop_all(procs: list, pipes: list) -> None:
    """Tell every helper process to stop; kill those that do not within 10 s."""
    for pipe in pipes:
        pipe.send("stop")
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def _echo(conn) -> None:
    """The small-RPC baseline's server: a bare grpcio unary method that returns its request."""
    from concurrent import futures

    import grpc

    from elasticd.rpc.limits import GRPC_OPTIONS
    from elasticd.serving import GRPC_THREADS

    handler = grpc.unary_unary_rpc_method_handler(lambda request, _context: request)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_THREADS), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    conn.recv()  # anything: stop
    server.stop(None).wait()


def small_rpc_rates(pair: Callable[[], None], echo: Callable[[], None]) -> tuple[float, float]:
    """(PS push+pull pairs/s, bare unary round trips/s), timed in alternating slices so
    background load falls on both alike."""
    counts, spent = {"pair": 0, "echo": 0}, {"pair": 0.0, "echo": 0.0}
    for _ in range(SMALL_RPC_SLICES):
        for name, fn in (("pair", pair), ("echo", echo)):
            started = time.perf_counter()
            while time.perf_counter() - started < SMALL_RPC_SECONDS / SMALL_RPC_SLICES:
                fn()
                counts[name] += 1
            spent[name] += time.perf_counter() - started
    return counts["pair"] / spent["pair"], counts["echo"] / spent["echo"]


def _sink(conn) -> None:
    """The socket baseline's receiver: reads length-prefixed blobs and acknowledges each."""
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    s, _ = listener.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(0)
    while True:
        head = s.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        if len(buf) < n:
            buf = bytearray(n)
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            got += s.recv_into(view[got:], n - got)
        s.sendall(b"k")


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


class SocketBaseline:
    """A raw loopback TCP connection to a sink process; ``send`` times one blob."""

    def __init__(self, ctx) -> None:
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sink, args=(child,), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(("127.0.0.1", parent.recv()))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: memoryview) -> None:
        self.sock.sendall(struct.pack("<Q", len(payload)))
        self.sock.sendall(payload)
        if self.sock.recv(1) != b"k":
            raise RuntimeError("socket sink went away")

    def close(self) -> None:
        self.sock.close()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``, every thread included (also those that ended).

    Linux's process CPU clock (clockid ``(~pid << 3) | 2``) has nanosecond
    resolution; psutil's figures come in 10 ms ticks, too coarse for one
    transfer, and are the fallback elsewhere.
    """
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except (OSError, OverflowError):
        return sum(psutil.Process(pid).cpu_times()[:2])


@dataclass
class Timing:
    wall_s: float  # median wall seconds of one call
    cpu_s: dict[str, float]  # median CPU seconds of one call, per role (client, servers, sink)


def interleaved(
    fns: dict[str, Callable[[], object]], roles: dict[str, list[int]], reps: int
) -> dict[str, Timing]:
    """Median wall and CPU time of each function, run in rounds (one call of each per round).

    Interleaving spreads the machine's background load over all figures alike,
    so their ratio is steadier than that of figures measured one after another.
    CPU time is counted per role (a list of pids each): on a shared machine it
    says what a transfer costs even when the wall clock is disturbed.
    """

    def cpu() -> dict[str, float]:
        return {role: sum(cpu_seconds(pid) for pid in pids) for role, pids in roles.items()}

    for fn in fns.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in fns}
    used: dict[str, dict[str, list[float]]] = {k: {r: [] for r in roles} for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = cpu(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            c1 = cpu()
            for r in roles:
                used[k][r].append(c1[r] - c0[r])
    return {
        k: Timing(statistics.median(wall[k]), {r: statistics.median(v) for r, v in used[k].items()})
        for k in fns
    }


def _tls_settings():
    """This process's settings for a run with mutual TLS: a throw-away CA and a node certificate
    (this process is every PS and their client: it acts as any daemon kind)."""
    import tempfile
    from pathlib import Path

    from elasticd.security.certs import make_authority
    from elasticd.security.config import Security, use
    from elasticd.security.identities import NODE_CERT

    directory = Path(tempfile.mkdtemp(prefix="bench-ps-tls-"))
    ca = make_authority(directory)
    ps = ca.issue(directory, NODE_CERT, ("127.0.0.1",))
    security = Security(
        tls_cert=str(ps.cert), tls_key=str(ps.key), tls_ca=str(ca.cert), tls_client_auth=True
    )
    use(security)  # the bench's tiers are the workers: they connect with these settings
    return security


def run(argv: list[str]) -> dict:
    from elasticd.placement import TensorSpec, place
    from elasticd.ps_client import PSTier

    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    p = argparse.ArgumentParser(prog="python -m bench ps")
    p.add_argument("--scale", type=float, default=1.0, help="model size factor (1: 64 MiB)")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--server-threads", type=int, default=None)
    p.add_argument("--tls", action="store_true", help="mutual TLS on gRPC and replication")
    args = p.parse_args(argv)
    security = _tls_settings() if args.tls else None

    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    shapes = [(max(1, int(r * args.scale)), c) for r, c in MODEL_SHAPES]
    params = {f"layer{i}.weight": torch.randn(shape) for i, shape in enumerate(shapes)}
    nbytes = sum(t.numel() * t.element_size() for t in params.values())
    grads = {n: torch.randn_like(t) * 1e-3 for n, t in params.items()}

    procs, pipes = [], []
    try:
        addresses = start_servers(ctx, args.servers, args.server_threads, procs, pipes, security)

        specs = [TensorSpec(n, "float32", tuple(t.shape)) for n, t in params.items()]
        placement = place(specs, sorted(addresses))
        tier = PSTier("bench-ps", 1, placement, addresses, worker_id="bench.0")
        tier.init(params, "sgd", {"lr": 1e-6}, -1, 1, 0)

        versions: dict[str, int] = {}

        def pull() -> None:
            versions.update(tier.pull_into(params))

        def push() -> None:
            tier.push(grads, versions)

        # The same model with hot replicas (ps.replicas: 2) on the same servers: each
        # push is applied on a group's primary and forwarded to its backup before the reply.
        replicated = place(specs, sorted(addresses), replicas=2)
        rep_tier = PSTier("bench-rep", 1, replicated, addresses, worker_id="bench.0")
        rep_tier.init(params, "sgd", {"lr": 1e-6}, -1, 1, 0)
        rep_versions = rep_tier.pull_into(params)

        def push_replicated() -> None:
            rep_tier.push(grads, rep_versions)

        flat = torch.cat([t.reshape(-1) for t in params.values()])
        payload = memoryview(flat.numpy()).cast("B")
        baseline = SocketBaseline(ctx)
        try:
            timings = interleaved(
                {
                    "socket": lambda: baseline.send(payload),
                    "pull": pull,
                    "push": push,
                    "push_replicated": push_replicated,
                },
                {
                    "client": [os.getpid()],
                    "servers": [pr.pid for pr in procs],
                    "sink": [baseline.proc.pid],
                },
                args.reps,
            )
        finally:
            baseline.close()
        pull_s, push_s, socket_s = (timings[k].wall_s for k in ("pull", "push", "socket"))
        push_rep_s = timings["push_replicated"].wall_s

        small = {"x": torch.randn(1024)}
        small_tier = PSTier(
            "bench-small",
            1,
            place([TensorSpec("x", "float32", (1024,))], ["ps-0"]),
            addresses,
            worker_id="bench.0",
        )
        small_tier.init(small, "sgd", {"lr": 1e-6}, -1, 1, 0)
        small_grad = {"x": torch.randn(1024) * 1e-3}

        def pair() -> None:
            small_tier.push(small_grad, small_tier.pull_into(small))

        import grpc

        parent, child = ctx.Pipe()
        echo_proc = ctx.Process(target=_echo, args=(child,), daemon=True)
        echo_proc.start()
        procs.append(echo_proc)
        pipes.append(parent)
        channel = grpc.insecure_channel(f"127.0.0.1:{parent.recv()}")
        echo_call = channel.unary_unary("/bench.Echo/Echo")
        request = bytes(4096)
        for _ in range(20):
            pair()
            echo_call(request)
        small_rate, echo_rate = small_rpc_rates(pair, lambda: echo_call(request))
        channel.close()
        small_tier.close()
        rep_tier.close()
        tier.close()
    finally:
        stop_all(procs, pipes)

    pull_gbps, push_gbps, socket_gbps = (
        _gbps(nbytes, pull_s),
        _gbps(nbytes, push_s),
        _gbps(nbytes, socket_s),
    )
    return {
        "model_mb": round(nbytes / 1e6, 1),
        "tls": args.tls,
        "ps_servers": args.servers,
        "pull_gbps": round(pull_gbps, 3),
        "push_gbps": round(push_gbps, 3),
        "socket_gbps": round(socket_gbps, 3),
        "ratio": round(min(pull_gbps, push_gbps) / socket_gbps, 3),
        "small_rpc_per_s": round(small_rate, 1),
        "echo_rpc_per_s": round(echo_rate, 1),
        # a pair is two round trips: 1.0 would mean each costs no more than a bare unary echo
        "small_rpc_ratio": round(small_rate / (echo_rate / 2), 3),
        # push throughput with ps.replicas: 2 over without, same servers and model
        "replica_push_ratio": round(push_s / push_rep_s, 3),
        "push_replicated_s": round(push_rep_s, 4),
        "pull_s": round(pull_s, 4),
        "push_s": round(push_s, 4),
        "socket_s": round(socket_s, 4),
        **{
            f"{k}_cpu_{role}_s": round(v, 4)
            for k in ("pull", "push", "push_replicated", "socket")
            for role, v in timings[k].cpu_s.items()
            if not (k == "socket" and role == "servers") and not (k != "socket" and role == "sink")
        },
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "reps": args.reps,
        "cpus": os.cpu_count(),
    }
