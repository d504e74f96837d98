"""The probe process: import torch once, fork one limited child per question.

Protocol, one JSON object per line: the controller writes requests
``{"id", "task", "batch_size", "seed", "task_args"}`` on this process's
stdin; it answers ``{"ready": true}`` once, then one reply per request,
``{"id", "status": "exited"|"signalled"|"timeout"|"overflow", "code",
"result", "log"}``, in the order the children end. ``result`` is what the
child wrote to its result descriptor (untrusted: the controller validates
it), ``log`` the tail of what it printed.

Each child: a new session (its own process group, killed as a whole when it
overruns the timeout), stdin on /dev/null, stdout and stderr into the log
pipe, the answer on descriptor 3, limits it cannot raise again (setrlimit:
RLIMIT_AS, which counts every mapping, shared anonymous memory included,
where RLIMIT_DATA does not; RLIMIT_CPU; RLIMIT_NPROC, which binds a user
other than root; no core files), and SIGKILL when this process dies.

A process the task starts may leave the child's session (``setsid()``) and
its parent may exit, so neither the process group nor the session finds it.
No cgroup is used (creating one needs a writable, delegated cgroup tree,
which a controller in a container seldom has); instead this process is the
*child subreaper* of everything below it (PR_SET_CHILD_SUBREAPER): an
orphan is reparented here, not to init, so every process a task started
stays a descendant of this one. Each poll walks /proc for the descendants
of every running child (:func:`descendants`); a child that overruns its
timeout is killed with all of them, and an orphan (a process reparented
here that is not a child) is killed as soon as it is seen: nothing a task
starts outlives its question. This process itself runs only elasticd and
torch code; when its stdin closes it kills its children and exits.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from elasticd.shape_probe.build import run_child
from elasticd.shape_probe.limits import LOG_TAIL, RESULT_LIMIT

POLL_S = 0.1  # how often exited children (and their descendants) are looked for while some run
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
PROBE_PROCESSES = 1024  # RLIMIT_NPROC of a child (processes and threads of its user)


@dataclass
class Child:
    request_id: int
    pid: int
    deadline: float
    fds: dict[int, str]  # fd -> "result" | "log", while open
    result: bytearray = field(default_factory=bytearray)
    log: bytearray = field(default_factory=bytearray)
    outcome: str = ""  # "timeout" | "overflow" once this process killed it
    tree: set[int] = field(default_factory=set)  # its descendants, as last seen

    def kill(self, outcome: str) -> None:
        if not self.outcome:
            self.outcome = outcome
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # Those that left its process group: still below this process (subreaper).
            kill_all(self.tree & descendants(process_table(), os.getpid()))


def process_table() -> dict[int, int]:
    """pid -> parent pid of every process this one can see (/proc)."""
    table: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(entry.name)] = int(fields[1])
    return table


def descendants(table: dict[int, int], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, ())
    return found


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _limit(child_timeout_s: float, memory_bytes: int) -> None:
    """Limits a child keeps, whatever its code does (soft = hard: none can be raised)."""
    cpu = int(child_timeout_s) + 2  # the wall-clock timeout comes first; this bounds a spinner
    for name, value in (
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_NPROC, PROBE_PROCESSES),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(name, (value, value))


def _child_main(
    request: dict[str, Any], result_w: int, log_w: int, memory_bytes: int, timeout_s: float
) -> None:
    code = 70
    try:
        os.setsid()
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_w, 1)
        os.dup2(log_w, 2)
        os.dup2(result_w, 3)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
        _limit(timeout_s, memory_bytes)
        code = run_child(request, 3)
    finally:
        os._exit(code)


def fork_child(request: dict[str, Any], timeout_s: float, memory_bytes: int) -> Child:
    result_r, result_w = os.pipe()
    log_r, log_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child_main(request, result_w, log_w, memory_bytes, timeout_s)
    os.close(result_w)
    os.close(log_w)
    for fd in (result_r, log_r):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return Child(
        request["id"], pid, time.monotonic() + timeout_s, {result_r: "result", log_r: "log"}
    )


def read_from(child: Child, fd: int) -> None:
    """Read what is there; close ``fd`` at its end. An answer past the limit kills the child."""
    while fd in child.fds:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            os.close(fd)
            del child.fds[fd]
        elif child.fds[fd] == "log":
            child.log = (child.log + data)[-LOG_TAIL:]
        elif len(child.result) + len(data) > RESULT_LIMIT:
            child.kill("overflow")
            child.result.clear()
        else:
            child.result += data


def reply_for(child: Child, status: int) -> dict[str, Any]:
    code = os.waitstatus_to_exitcode(status)
    if child.outcome:
        kind = child.outcome
    else:
        kind = "signalled" if code < 0 else "exited"
    return {
        "id": child.request_id,
        "status": kind,
        "code": code,
        "result": child.result.decode("utf-8", "replace"),
        "log": child.log.decode("utf-8", "replace"),
    }


def _write_line(fd: int, obj: dict[str, Any]) -> None:
    view = memoryview(json.dumps(obj).encode() + b"\n")
    while view:
        view = view[os.write(fd, view) :]


def sweep(children: dict[int, Child], orphans: set[int]) -> None:
    """Note each running child's descendants; kill the orphans reparented here (with theirs)
    and reap those that ended."""
    table = process_table()
    me = os.getpid()
    for child in children.values():
        child.tree |= descendants(table, child.pid)
    for pid, ppid in table.items():
        if ppid == me and pid not in children and pid not in orphans:
            kill_all({pid} | descendants(table, pid))
            orphans.add(pid)
    for pid in list(orphans):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        except ChildProcessError:
            pass
        orphans.discard(pid)


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the process group and session kills remain


def serve(timeout_s: float, memory_mib: int, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    memory_bytes = memory_mib << 20
    children: dict[int, Child] = {}  # pid -> child
    orphans: set[int] = set()  # killed, not yet reaped
    pending = b""
    reading = True
    _become_subreaper()
    _write_line(stdout_fd, {"ready": True})
    while reading or children or orphans:
        fds = [fd for c in children.values() for fd in c.fds]
        if reading:
            fds.append(stdin_fd)
        now = time.monotonic()
        busy = children or orphans
        wait = min([POLL_S] + [c.deadline - now for c in children.values()]) if busy else None
        ready, _, _ = select.select(fds, [], [], None if wait is None else max(wait, 0.0))
        if reading and stdin_fd in ready:
            data = os.read(stdin_fd, 65536)
            if not data:  # the controller is gone: nobody wants the answers
                reading = False
                for c in children.values():
                    c.kill("timeout")
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    child = fork_child(json.loads(line), timeout_s, memory_bytes)
                except (ValueError, KeyError, TypeError, OSError) as exc:  # keep serving the rest
                    _write_line(stdout_fd, {"id": None, "status": "refused", "log": str(exc)})
                    continue
                children[child.pid] = child
        ended = False
        for child in list(children.values()):
            for fd in [fd for fd in child.fds if fd in ready]:
                read_from(child, fd)
            if time.monotonic() > child.deadline:
                child.kill("timeout")
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid == 0:
                continue
            ended = True
            for fd in list(child.fds):  # what it wrote before it ended, then let go
                read_from(child, fd)
                if fd in child.fds:  # held open by a grandchild: not waited for
                    os.close(fd)
                    del child.fds[fd]
            del children[child.pid]
            if reading:
                _write_line(stdout_fd, reply_for(child, status))
        if children or orphans or ended:  # an ended child's orphans are ours by now
            sweep(children, orphans)
    return 0
