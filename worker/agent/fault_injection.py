"""Fault injection on a node, for `elasticd chaos` on a real cluster.

Off by default: an agent serves it only when started with ``--allow-chaos``.
It may signal exactly two kinds of process: a training process it
supervises, or itself. Never a PID the caller names, so the RPC cannot be
turned into "signal anything on this machine".

:func:`plan_fault` is the decision (which process, which signal, when it is
resumed), a plain function over plain data; :class:`FaultExecutor` carries it
out. A stopped training process is resumed by a timer in the agent; the agent
stopping itself first starts a small resumer process, since a stopped agent
runs no timers. Signals to the agent itself are sent a moment after the reply
leaves, so the caller learns what was done.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP, "SIGCONT": signal.SIGCONT}
MAX_RESUME_AFTER_S = 600.0  # nothing stays stopped longer than this
SELF_SIGNAL_DELAY_S = 0.2  # the reply goes out before the agent signals itself
AGENT = "agent"

# Runs as its own process: sleeps, then resumes the stopped agent.
_RESUMER = (
    "import os, signal, sys, time\n"
    "time.sleep(float(sys.argv[1]))\n"
    "try:\n"
    "    os.kill(int(sys.argv[2]), signal.SIGCONT)\n"
    "except ProcessLookupError:\n"
    "    pass\n"
)


class FaultRefused(Exception):
    """A fault this agent will not inject; ``code`` names the gRPC status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # INVALID_ARGUMENT or NOT_FOUND


@dataclass(frozen=True)
class FaultOrder:
    """What to do: send ``signal`` to ``pid`` (``target``: "agent" or a worker id)."""

    target: str
    pid: int
    signal: str
    resume_after_s: float = 0.0

    @property
    def on_self(self) -> bool:
        return self.target == AGENT


def plan_fault(
    job_id: str,
    worker_id: str,
    signal_name: str,
    resume_after_s: float,
    own_pid: int,
    worker_pid: Callable[[str, str], int],
) -> FaultOrder:
    """The order for one request; :class:`FaultRefused` when it cannot be done.

    ``worker_pid(job, worker)`` is the pid of a process this agent supervises
    (0: none runs).
    """
    if signal_name not in SIGNALS:
        raise FaultRefused("INVALID_ARGUMENT", f"signal must be one of {sorted(SIGNALS)}")
    if not 0 <= resume_after_s <= MAX_RESUME_AFTER_S:
        raise FaultRefused(
            "INVALID_ARGUMENT", f"resume_after_s must be within [0, {MAX_RESUME_AFTER_S:g}]"
        )
    if resume_after_s and signal_name != "SIGSTOP":
        raise FaultRefused("INVALID_ARGUMENT", "resume_after_s goes with SIGSTOP only")
    if not job_id and not worker_id:
        if signal_name == "SIGSTOP" and not resume_after_s:
            raise FaultRefused(
                "INVALID_ARGUMENT",
                "a stopped agent cannot resume itself: give resume_after_s with SIGSTOP",
            )
        if signal_name == "SIGCONT":
            raise FaultRefused("INVALID_ARGUMENT", "the agent is running: nothing to resume")
        return FaultOrder(AGENT, own_pid, signal_name, resume_after_s)
    if not job_id or not worker_id:
        raise FaultRefused(
            "INVALID_ARGUMENT", "name both job_id and worker_id, or neither (the agent itself)"
        )
    pid = worker_pid(job_id, worker_id)
    if not pid:
        raise FaultRefused(
            "NOT_FOUND", f"no training process of job {job_id} worker {worker_id} on this node"
        )
    return FaultOrder(worker_id, pid, signal_name, resume_after_s)


class FaultExecutor:
    """Sends the signal of a :class:`FaultOrder` and arranges its SIGCONT."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def execute(self, order: FaultOrder) -> None:
        log.warning(
            "event=fault_injected node=%s target=%s pid=%d signal=%s resume_after_s=%g",
            self.node_id,
            order.target,
            order.pid,
            order.signal,
            order.resume_after_s,
        )
        if not order.on_self:
            _send(order.pid, order.signal)
            if order.resume_after_s:
                self._timer(order.resume_after_s, _send, order.pid, "SIGCONT")
            return
        if order.resume_after_s:
            # Its own session: the stopped agent's process group is not stopped with it.
            subprocess.Popen(
                [sys.executable, "-S", "-c", _RESUMER,
                 str(order.resume_after_s + SELF_SIGNAL_DELAY_S), str(order.pid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self._timer(SELF_SIGNAL_DELAY_S, _send, order.pid, order.signal)

    @staticmethod
    def _timer(delay: float, fn: Callable, *args) -> None:
        timer = threading.Timer(delay, fn, args)
        timer.daemon = True
        timer.start()


def _send(pid: int, signal_name: str) -> None:
    try:
        os.kill(pid, SIGNALS[signal_name])
    except ProcessLookupError:
        log.info("event=fault_target_gone pid=%d signal=%s", pid, signal_name)
