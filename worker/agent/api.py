"""The agent's vocabulary: what it runs and the states it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

STARTING = "STARTING"
RUNNING = "RUNNING"
# Exited abnormally; waiting for the controller to seal a generation before
# it comes back (modes whose processes form a group: allreduce, script).
RESTARTING = "RESTARTING"
# A replacement that has started and built its model (allreduce): it joins the
# next generation the controller seals with it.
READY = "READY"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"


@dataclass(frozen=True)
class ProcessSpec:
    """One training process to run: identity, command line, environment, log file."""

    job_id: str
    worker_id: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.worker_id)


@dataclass(frozen=True)
class Exited:
    """A supervised process ended with ``code`` (negative: killed by that signal)."""

    key: tuple[str, str]
    code: int
    pid: int
