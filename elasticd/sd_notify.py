"""systemd's notify protocol, spoken by the daemons themselves (``Type=notify`` units).

A unit with ``Type=notify`` starts a daemon with ``NOTIFY_SOCKET`` set, and with
``WatchdogSec=`` also ``WATCHDOG_USEC``. The daemon sends ``READY=1`` once it
serves (its port is open and it is registered in etcd), then ``WATCHDOG=1``
every half watchdog period while it is healthy, and ``STOPPING=1`` when it
begins to stop. A daemon that hangs stops sending and systemd restarts it
(``Restart=on-failure``). Outside systemd (no ``NOTIFY_SOCKET``) all of this
does nothing.

Healthy means the process's own machinery still runs (its etcd session's
keepalive thread is alive), not that etcd answers: an etcd outage must not
make systemd restart every agent and kill the training it holds.

The variables are taken out of the environment when read, as sd_notify(3)'s
``unset_environment`` does, so that the training processes an agent starts
do not speak for it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str = "", watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._stop = threading.Event()
        # No WATCHDOG=1 after STOPPING=1: systemd stops enforcing the watchdog when a unit
        # stops, and a late ping could arm it again for a drain that no longer pings.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_environment(cls, environ=None) -> Notifier:
        """Read and remove the notify variables from ``environ`` (os.environ)."""
        env = os.environ if environ is None else environ
        values = {k: env.pop(k, "") for k in _VARIABLES}
        usec = 0
        if values["WATCHDOG_USEC"].isdigit():
            pid = values["WATCHDOG_PID"]
            if not pid or (pid.isdigit() and int(pid) == os.getpid()):
                usec = int(values["WATCHDOG_USEC"])
        return cls(values["NOTIFY_SOCKET"], usec)

    def send(self, *fields: str) -> bool:
        """Send ``fields`` ("READY=1", "STATUS=...") in one datagram; False if not under systemd."""
        if not self.address:
            return False
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # Never wait on a listener that does not read: a full queue drops the message.
                s.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, address)
            return True
        except OSError as exc:
            log.warning("event=sd_notify_failed socket=%s error=%s", self.address, exc)
            return False

    def ready(self, status: str, healthy: Callable[[], bool] = lambda: True) -> None:
        """Tell systemd the daemon serves, and keep its watchdog fed while ``healthy()``."""
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        if self.watchdog_usec and self._thread is None:
            interval = self.watchdog_usec / 1e6 / 2
            self._thread = threading.Thread(
                target=self._watchdog, args=(interval, healthy), name="sd-watchdog", daemon=True
            )
            self._thread.start()

    def _watchdog(self, interval: float, healthy: Callable[[], bool]) -> None:
        while not self._stop.wait(interval):
            try:
                ok = healthy()
            except Exception:
                log.exception("event=health_check_error")
                ok = False
            if ok:
                with self._lock:
                    if not self._stop.is_set():
                        self.send("WATCHDOG=1")
            else:
                log.warning("event=watchdog_withheld reason=unhealthy")

    def stopping(self) -> None:
        """Say STOPPING=1, once however often called (an agent says it when its drain begins)."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            self.send("STOPPING=1")
