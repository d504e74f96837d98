"""Hung training processes: a heartbeat file older than the job's ``hang_timeout_s``.

A ps-async or allreduce process touches ``<job dir>/<worker>.heartbeat`` as it trains. One
that has beaten once and then fell silent past its job's timeout is SIGKILLed,
and the agent handles its exit as any other (a restart, or FAILED). Start-up is
not judged (no heartbeat yet), nor are script processes (they do not beat).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger(__name__)


class RunningProcess(Protocol):
    job_id: str
    worker_id: str
    generation: int
    assignment: dict


def kill_hung(
    running: Iterable[RunningProcess],
    heartbeat_of: Callable[[str, str], str],
    kill: Callable[[tuple[str, str]], object],
) -> None:
    """``kill`` each of the ``running`` processes whose heartbeat file (``heartbeat_of(job,
    worker)``) is too old."""
    now = time.time()
    for slot in running:
        timeout = float(slot.assignment["spec"].get("hang_timeout_s", 0) or 0)
        if not timeout or slot.assignment["spec"]["mode"] == "script":
            continue
        path = heartbeat_of(slot.job_id, slot.worker_id)
        try:
            silent = now - os.stat(path).st_mtime
        except FileNotFoundError:
            continue
        if silent > timeout:
            log.warning(
                "event=worker_hung job=%s generation=%d worker=%s silent_s=%.1f timeout_s=%.1f",
                slot.job_id,
                slot.generation,
                slot.worker_id,
                silent,
                timeout,
            )
            kill((slot.job_id, slot.worker_id))
