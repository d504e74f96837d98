"""The training process's side of the agent's control pipe.

The agent writes JSON lines on the process's stdin: the first carries the
assignment to start with, later ones a new assignment (a new generation) to
adopt at the next step boundary. End of input means the agent is gone.

A warm process (started before anybody needs it, torch already imported)
first gets ``{"adopt": {"env": ..., "argv": ...}}``, the environment of the
process it becomes (its log file comes as a descriptor on the ready socket), and may get ``{"preload": [module, ...]}``,
task modules to import while it waits. An adoption whose ``argv`` is
``["--script", PATH, ARGS...]`` makes it a script process: :meth:`first`
returns a :class:`ScriptRun` instead of an assignment.

A later assignment may leave the process out (``members`` does not list
it): its job fell below ``workers.min``, and an allreduce process stops at
the next step boundary and waits, keeping its replica, for a generation that
lets it in again.

A first message marked ``standby`` starts a replacement for a process that
failed: it carries the generation the failed one trained in, and the process
prepares (imports, builds its model), says it is ready with
:func:`announce_ready`, and trains only in a later generation that the
controller seals with it once it is ready (ARCHITECTURE invariant 9).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elasticd.security.channels import use_job_credential
from elasticd.worker.runtime import heartbeat

log = logging.getLogger(__name__)


class GroupAbandoned(RuntimeError):
    """No group can be formed: the agent is gone, or nothing changed within the reform timeout."""


@dataclass(frozen=True)
class ScriptRun:
    """Run the user's script ``path`` with ``args``, as ``python path args`` would."""

    path: str
    args: tuple[str, ...]

    @classmethod
    def from_argv(cls, argv: list[str]) -> ScriptRun | None:
        if len(argv) < 2 or argv[0] != "--script":
            return None
        return cls(argv[1], tuple(argv[2:]))


@dataclass(frozen=True)
class Assignment:
    job_id: str
    worker_id: str
    generation: int
    world_size: int
    rank: int
    local_rank: int
    spec: dict[str, Any]
    placement: list | None
    ps: dict[str, str]
    controller: str
    # After a restore from a checkpoint: the generation that began from it, and
    # the batch index its data stream starts again at.
    resume_generation: int = 0
    resume_position: int = 0
    checkpoint_url: str = ""  # where the job's checkpoints go (the spec's, else the cluster's)
    resume_from: str = ""  # the checkpoint the job was submitted to start from
    peers: tuple[str, ...] = ()  # the other members of this generation
    # False: the generation leaves this process out (an allreduce job below workers.min
    # keeps its processes waiting, with their replicas, for a later one); rank is -1
    member: bool = True

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Assignment:
        a = message["assignment"]
        me = next((m for m in a["members"] if m["worker_id"] == a["worker_id"]), None)
        return cls(
            job_id=a["job_id"],
            worker_id=a["worker_id"],
            generation=int(a["generation"]),
            world_size=int(a["world_size"]),
            rank=int(me["rank"]) if me else -1,
            local_rank=int(me["local_rank"]) if me else -1,
            spec=a["spec"],
            placement=a.get("placement"),
            ps=a.get("ps", {}),
            controller=a["controller"],
            resume_generation=int(a.get("resume", {}).get("generation", 0)),
            resume_position=int(a.get("resume", {}).get("position", 0)),
            checkpoint_url=a.get("checkpoint", {}).get("url", ""),
            resume_from=a.get("checkpoint", {}).get("resume_from", ""),
            peers=tuple(
                m["worker_id"]
                for m in a.get("all_members", a["members"])
                if m["worker_id"] != a["worker_id"]
            ),
            member=me is not None,
        )


class ControlChannel:
    def __init__(self, stream=None) -> None:
        # The raw descriptor, not sys.stdin: a daemon thread blocked in a
        # buffered read holds its lock and aborts interpreter shutdown.
        self._stream = stream if stream is not None else open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115
        self._latest: Assignment | None = None
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self.standby = False  # the first assignment is the failed process's: wait for a newer
        self._credential_generation = 0

    def first(self, warm_up: Callable[[], None] | None = None) -> Assignment | ScriptRun:
        """The first assignment. A warm process (its first message says ``warm``)
        calls ``warm_up`` and imports its preloads while it waits to be taken."""
        line = self._stream.readline()
        if not line:
            raise SystemExit("control pipe closed before an assignment arrived")
        message = json.loads(line)
        while "assignment" not in message:  # a warm process, before it is taken
            if message.get("warm") and warm_up is not None:
                warm_up()
            if "adopt" in message:
                adopt(message["adopt"])
                script = ScriptRun.from_argv(message["adopt"].get("argv", []))
                if script is not None:
                    return script  # a script reads no assignments
            for module in message.get("preload", ()):
                preload(module)
            line = self._stream.readline()
            if not line:
                raise SystemExit("control pipe closed before an assignment arrived")
            message = json.loads(line)
        self.standby = bool(message.get("standby"))
        assignment = self._take(message)
        threading.Thread(target=self._read, name="control", daemon=True).start()
        return assignment

    def _read(self) -> None:
        for line in self._stream:
            message = json.loads(line)
            if "assignment" in message:
                assignment = self._take(message)
                with self._lock:
                    self._latest = assignment
        self.closed.set()

    def _take(self, message: dict[str, Any]) -> Assignment:
        """The assignment a message carries; its credential is this process's from now on
        (it also covers the older generations, which every server fences anyway)."""
        assignment = Assignment.from_message(message)
        if assignment.generation >= self._credential_generation:
            self._credential_generation = assignment.generation
            use_job_credential(message["assignment"].get("credential", ""))
        return assignment

    def push_back(self, assignment: Assignment) -> None:
        """Return ``assignment`` to the next :meth:`poll`, unless a newer one arrived."""
        with self._lock:
            if self._latest is None or self._latest.generation < assignment.generation:
                self._latest = assignment

    def poll(self) -> Assignment | None:
        """The newest assignment received since the last poll, if any."""
        with self._lock:
            latest, self._latest = self._latest, None
            return latest


class AssignmentFeed:
    """The newest assignment of this process, refreshed from the agent's control pipe."""

    def __init__(self, first: Assignment, control: ControlChannel | None) -> None:
        self.current = first
        self._control = control

    def refresh(self) -> bool:
        """Adopt the newest assignment on the pipe (never an older generation); True if one came."""
        if self._control is None:
            return False
        new = self._control.poll()
        if new is None or new.generation < self.current.generation:
            return False
        self.current = new
        return True

    @property
    def closed(self) -> bool:
        return self._control is not None and self._control.closed.is_set()

    def newer_than(self, generation: int, timeout: float = 60.0) -> Assignment:
        """The first assignment newer than ``generation`` (another rank may have seen it
        first), or the current one after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.current.generation <= generation and not self.closed:
            if time.monotonic() > deadline:
                break
            self.refresh()
            time.sleep(0.01)
        return self.current

    def outside(self, generation: int, step: int) -> None:
        """Wait, however long and without stepping, for a generation newer than
        ``generation``, which left this process out: its replica, at ``step``, is
        kept for the generation that lets it in again."""
        log.info(
            "event=outside_generation job=%s generation=%d worker=%s step=%d",
            self.current.job_id,
            generation,
            self.current.worker_id,
            step,
        )
        self.admitted(generation)

    def admitted(self, generation: int) -> None:
        """Wait, however long, until the controller seals a generation newer than
        ``generation`` (a standby waiting to be let in); GroupAbandoned if the agent goes."""
        while self.current.generation <= generation:
            if self.closed:
                raise GroupAbandoned("control pipe closed: the agent is gone")
            heartbeat.beat()
            self.refresh()
            time.sleep(0.01)
        log.info(
            "event=admitted job=%s generation=%d worker=%s waited_after=%d",
            self.current.job_id,
            self.current.generation,
            self.current.worker_id,
            generation,
        )


def announce_ready() -> None:
    """Tell the agent, once, that this process has started and can train.

    Writes to the descriptor the agent passed in ``ELASTICD_READY_FD``; a
    process started otherwise (a test, by hand) has none and says nothing.
    """
    fd = os.environ.pop("ELASTICD_READY_FD", "")
    if not fd:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except (OSError, ValueError):
        pass  # the agent is gone: the control pipe says so too


def adopt(identity: dict[str, Any]) -> None:
    """Become the process the agent is starting: its environment (the process's own
    variables, on top of the allow-listed ones this one started with), and its log
    file, which the agent opened and passed on the ready socket just before."""
    os.environ.update({str(k): str(v) for k, v in identity.get("env", {}).items()})
    fd = _log_from_agent()
    if fd is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def _log_from_agent() -> int | None:
    ready = os.environ.get("ELASTICD_READY_FD", "")
    if not ready:
        return None
    with socket.socket(fileno=os.dup(int(ready))) as sock:
        sock.settimeout(30.0)  # it was sent before the adopt message
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        except OSError as exc:
            print(f"no log file from the agent: {exc}", file=sys.stderr, flush=True)
            return None
    return fds[0] if fds else None


def preload(module: str) -> None:
    """Import a task module ahead of its assignment; one that fails is imported again later."""
    from elasticd.task import import_task_module

    try:
        import_task_module(module)
    except Exception as exc:  # the job's own load reports it, with the job's context
        print(f"preload of {module!r} failed: {exc}", file=sys.stderr, flush=True)
