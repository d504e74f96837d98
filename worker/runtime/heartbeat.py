"""The training process's liveness signal to its agent.

The main thread touches a file (named by ``ELASTICD_HEARTBEAT_FILE``) on every
step and while it waits for a group to form. A process that stops beating —
stopped, deadlocked, stuck in a collective that never times out — is killed
by its agent after the job's ``hang_timeout_s`` and then handled as any
failed process. Beats come only from the thread that trains, never from a
helper thread, so a wedged main loop cannot hide behind a live one.
"""

from __future__ import annotations

import os
import time

BEAT_INTERVAL_S = 0.5  # at most one touch per interval: a beat costs one utime call

_last = 0.0


def beat() -> None:
    global _last
    # Read on every beat: a warm process learns its file only when it is taken.
    path = os.environ.get("ELASTICD_HEARTBEAT_FILE", "")
    if not path:
        return
    now = time.monotonic()
    if now - _last < BEAT_INTERVAL_S:
        return
    _last = now
    try:
        os.utime(path)
    except FileNotFoundError:
        with open(path, "a"):
            pass
