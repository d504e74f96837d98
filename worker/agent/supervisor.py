"""Start, watch and stop training processes. The supervisor never trains.

Each process gets its own process group (so a stop reaches everything it
spawned), a parent-death signal (so nothing outlives the agent, even when
the agent is SIGKILLed), its stdout and stderr in a log file, a pipe on
stdin through which the agent sends it control messages as JSON lines, and a
pipe back (descriptor ``ELASTICD_READY_FD``) on which it says once that it has
started and is ready to train. A process exit is seen at once by a waiting
thread, not by polling etcd.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from elasticd.spawn import spawn
from elasticd.worker.agent.api import Exited, ProcessSpec

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


READY_FD_ENV = "ELASTICD_READY_FD"


class ProcessSupervisor:
    def __init__(
        self,
        on_exit: Callable[[Exited], None],
        on_ready: Callable[[tuple[str, str], int], None] | None = None,
    ) -> None:
        self._on_exit = on_exit
        self._on_ready = on_ready
        self._procs: dict[tuple[str, str], subprocess.Popen] = {}
        self._lock = threading.Lock()
        # Processes are started from this one long-lived thread: the parent-death
        # signal fires when the *thread* that forked a child exits.
        self._requests: list[tuple[ProcessSpec, threading.Event, list]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._spawner = threading.Thread(target=self._spawn_loop, name="spawner", daemon=True)
        self._spawner.start()

    def running(self) -> set[tuple[str, str]]:
        with self._lock:
            return {k for k, p in self._procs.items() if p.poll() is None}

    def pid(self, key: tuple[str, str]) -> int | None:
        with self._lock:
            p = self._procs.get(key)
            return p.pid if p else None

    def start(self, spec: ProcessSpec, first_message: dict | None = None) -> int:
        done = threading.Event()
        box: list = []
        with self._cond:
            self._requests.append((spec, done, box))
            self._cond.notify()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        proc, ready = box[0]
        if first_message is not None:
            self.send(spec.key, first_message)
        threading.Thread(target=self._wait, args=(spec.key, proc), daemon=True).start()
        threading.Thread(
            target=self._await_ready, args=(spec.key, proc.pid, ready), daemon=True
        ).start()
        return proc.pid

    def _spawn_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requests or self._closed)
                if self._closed and not self._requests:
                    return
                spec, done, box = self._requests.pop(0)
            try:
                box.append(self._spawn(spec))
            except OSError as exc:
                box.append(exc)
            done.set()

    def _spawn(self, spec: ProcessSpec) -> tuple[subprocess.Popen, int]:
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        logfile = open(spec.log_path, "ab")  # noqa: SIM115 - owned by the child
        ready_r, ready_w = os.pipe()
        try:
            proc = spawn(
                spec.argv,
                env={**os.environ, **spec.env, READY_FD_ENV: str(ready_w)},
                stdin=subprocess.PIPE,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                pass_fds=(ready_w,),
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            logfile.close()
            os.close(ready_w)
        with self._lock:
            self._procs[spec.key] = proc
        log.info(
            "event=process_started job=%s worker=%s pid=%d", spec.job_id, spec.worker_id, proc.pid
        )
        return proc, ready_r

    def _await_ready(self, key: tuple[str, str], pid: int, fd: int) -> None:
        """Tell ``on_ready`` when the process writes its ready line (EOF: it never will)."""
        with open(fd, "rb", buffering=0) as pipe:
            line = pipe.readline()
        if line.strip() == b"ready" and self._on_ready is not None:
            self._on_ready(key, pid)

    def _wait(self, key: tuple[str, str], proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._lock:
            if self._procs.get(key) is proc:
                del self._procs[key]
        log.info(
            "event=process_exited job=%s worker=%s pid=%d code=%d", key[0], key[1], proc.pid, code
        )
        self._on_exit(Exited(key, code, proc.pid))

    def send(self, key: tuple[str, str], message: dict) -> bool:
        """Write one JSON line to the process's stdin; False if it is gone."""
        with self._lock:
            proc = self._procs.get(key)
        if proc is None or proc.stdin is None:
            return False
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
            return True
        except (BrokenPipeError, ValueError, OSError):
            return False

    def stop(self, key: tuple[str, str], grace: float = STOP_GRACE_S) -> None:
        with self._lock:
            proc = self._procs.get(key)
        if proc is None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def kill(self, key: tuple[str, str]) -> None:
        """SIGKILL a process and everything it spawned (a hung process ignores SIGTERM)."""
        with self._lock:
            proc = self._procs.get(key)
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        with self._lock:
            keys = list(self._procs)
        threads = [threading.Thread(target=self.stop, args=(k, grace)) for k in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._cond:
            self._closed = True
            self._cond.notify()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
