"""Leaving an allreduce group at a step boundary when the agent stops the process.

A draining agent stops each training process with SIGTERM once the controller
has sealed a generation without it (worker/agent/drain.py). Dying there and
then would break the collective the survivors are in: they would see a failed
step, re-form and redo it. So while the process trains, SIGTERM only records
the request; the process says so in the next step's control vector ("re-form
after this step", as a newer generation does), every rank finishes that step,
and this one then exits at once with :data:`DEPARTED_EXIT` (:func:`depart_now`)
while the others form the new generation. Outside the training loop (forming a
group, waiting for an assignment) no collective is in flight, and SIGTERM ends
the process at once, as by default. A step that has not ended
:data:`LEAVE_GRACE_S` after SIGTERM (a peer is gone, or steps are that long)
is not waited for: the process exits then, as it did without this, and the
survivors redo the step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

DEPARTED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
LEAVE_GRACE_S = 5.0  # how long SIGTERM waits for the step boundary (inside the agent's 10 s)


class Departure:
    """Whether the process was asked to leave, and when SIGTERM may wait for a step's end."""

    def __init__(self, grace_s: float = LEAVE_GRACE_S) -> None:
        self.asked = False
        self.grace_s = grace_s
        self._deferring = False

    def install(self) -> None:
        """Handle SIGTERM here (only the main thread can)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, SIGTERM waits for the step boundary."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self._deferring and not self.asked:
            self.asked = True
            timer = threading.Timer(self.grace_s, depart_now)  # the step did not end: go
            timer.daemon = True
            timer.start()
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as by default (this is the main thread)
        os.kill(os.getpid(), signal.SIGTERM)


def depart_now() -> NoReturn:
    """Exit with :data:`DEPARTED_EXIT` without tearing the interpreter down: nothing is left
    to save (the survivors hold the replica), and torch's teardown of a group store this
    process hosted can hold the exit for seconds, and with it the agent's drain."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(DEPARTED_EXIT)
