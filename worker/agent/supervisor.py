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
WARM_RETRY_S = 1.0  # a warm process that died idle is replaced after this long
# A warm process is started once the one just taken says it is ready, or after this
# long: starting an interpreter meanwhile would slow the one the job waits for.
WARM_REFILL_S = 10.0
PRELOADS_KEPT = 8  # task modules a new warm process imports in advance

Key = tuple[str, str]  # (job id, worker id); a warm process: ("", "warm-<n>")


class ProcessSupervisor:
    """Runs processes by key; keeps ``warm`` processes of ``warm_argv`` started in advance.

    A warm process is started before anybody needs it and waits on its control
    pipe (the pool fills once the first such process is started). :meth:`start` of a spec with the same command takes one instead of
    starting a new interpreter: it sends the spec's environment and log file
    (``{"adopt": ...}``) and then the first message; another warm process
    starts once that one says it is ready (or after WARM_REFILL_S). :meth:`preload` has warm processes import a
    module before they are needed.
    """

    def __init__(
        self,
        on_exit: Callable[[Exited], None],
        on_ready: Callable[[Key, int], None] | None = None,
        warm: int = 0,
        warm_argv: tuple[str, ...] = (),
        warm_log_dir: str = "",
    ) -> None:
        self._on_exit = on_exit
        self._on_ready = on_ready
        self._procs: dict[Key, subprocess.Popen] = {}
        self._keys: dict[int, Key] = {}  # pid -> whose process it is now
        self._lock = threading.Lock()
        self._warm = warm if warm_argv else 0
        self._warm_argv = warm_argv
        self._warm_log_dir = warm_log_dir
        self._warm_started = 0  # names warm processes
        self._warm_pending = 0  # being started
        self._preloads: list[str] = []
        # Processes are started from this one long-lived thread: the parent-death
        # signal fires when the *thread* that forked a child exits.
        self._requests: list[tuple[ProcessSpec, threading.Event | None, list]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._spawner = threading.Thread(target=self._spawn_loop, name="spawner", daemon=True)
        self._spawner.start()

    def running(self) -> set[Key]:
        with self._lock:
            return {k for k, p in self._procs.items() if k[0] and p.poll() is None}

    def pid(self, key: Key) -> int | None:
        with self._lock:
            p = self._procs.get(key)
            return p.pid if p else None

    def warm_pids(self) -> list[int]:
        """The warm processes waiting to be taken."""
        with self._lock:
            return [p.pid for k, p in self._procs.items() if not k[0]]

    def start(self, spec: ProcessSpec, first_message: dict | None = None) -> int:
        """Start (or take a warm process for) ``spec``; the first one of ``warm_argv``
        starts the warm pool, so a node that never runs such a process keeps none."""
        n = len(self._warm_argv)
        warmable = bool(n) and spec.argv[:n] == self._warm_argv
        proc = self._take_warm(spec) if warmable else None
        if proc is not None:
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
            # the rest of the command line: what a process started for ``spec`` would run
            adopt = {"env": spec.env, "log": spec.log_path, "argv": list(spec.argv[n:])}
            self.send(spec.key, {"adopt": adopt})
            log.info(
                "event=process_adopted job=%s worker=%s pid=%d",
                spec.job_id,
                spec.worker_id,
                proc.pid,
            )
            self._refill(delay=WARM_REFILL_S)
        else:
            done = threading.Event()
            box: list = []
            with self._cond:
                self._requests.append((spec, done, box))
                self._cond.notify()
            done.wait()
            if isinstance(box[0], BaseException):
                raise box[0]
            proc = box[0]
            if warmable:
                self._refill(delay=WARM_REFILL_S)
        if first_message is not None:
            self.send(spec.key, first_message)
        return proc.pid

    def preload(self, module: str) -> None:
        """Have every warm process, and those started later, import ``module`` now."""
        with self._lock:
            if module in self._preloads:
                return
            self._preloads = [*self._preloads, module][-PRELOADS_KEPT:]
            idle = [k for k in self._procs if not k[0]]
        for key in idle:
            self.send(key, {"preload": [module]})

    def _take_warm(self, spec: ProcessSpec) -> subprocess.Popen | None:
        with self._lock:
            for key, proc in list(self._procs.items()):
                if not key[0] and proc.poll() is None:
                    del self._procs[key]
                    self._procs[spec.key] = proc
                    self._keys[proc.pid] = spec.key
                    return proc
        return None

    def _refill(self, delay: float = 0.0) -> None:
        """Start warm processes until ``warm`` are waiting (after ``delay`` seconds)."""
        if delay:
            timer = threading.Timer(delay, self._refill)
            timer.daemon = True
            timer.start()
            return
        with self._cond:
            if self._closed:
                return
            with self._lock:
                idle = sum(1 for k in self._procs if not k[0])
            missing = self._warm - idle - self._warm_pending
            for _ in range(max(missing, 0)):
                self._warm_started += 1
                name = f"warm-{self._warm_started}"
                path = os.path.join(self._warm_log_dir, f"{name}.log")
                spec = ProcessSpec("", name, self._warm_argv, {"PYTHONUNBUFFERED": "1"}, path)
                self._warm_pending += 1
                self._requests.append((spec, None, []))
            self._cond.notify()

    def _spawn_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requests or self._closed)
                if self._closed and not self._requests:
                    return
                spec, done, box = self._requests.pop(0)
                if done is None and self._closed:
                    continue  # no new warm process once stopping
            try:
                box.append(self._spawn(spec))
            except OSError as exc:
                box.append(exc)
                if done is None:
                    log.error("event=warm_start_failed error=%s", exc)
            if done is None:
                with self._cond:
                    self._warm_pending -= 1
            else:
                done.set()

    def _spawn(self, spec: ProcessSpec) -> subprocess.Popen:
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
            self._keys[proc.pid] = spec.key
            warm = not spec.job_id
            preloads = list(self._preloads) if warm else []
        if warm:  # it warms up while it waits: a launched process has no time to spare
            self.send(spec.key, {"warm": True, "preload": preloads})
        threading.Thread(target=self._wait, args=(proc,), daemon=True).start()
        threading.Thread(target=self._await_ready, args=(proc.pid, ready_r), daemon=True).start()
        log.info(
            "event=process_started job=%s worker=%s pid=%d", spec.job_id, spec.worker_id, proc.pid
        )
        return proc

    def _await_ready(self, pid: int, fd: int) -> None:
        """Tell ``on_ready`` when the process writes its ready line (EOF: it never will)."""
        with open(fd, "rb", buffering=0) as pipe:
            line = pipe.readline()
        with self._lock:
            key = self._keys.get(pid)
        if line.strip() != b"ready" or not key or not key[0]:
            return
        if self._on_ready is not None:
            self._on_ready(key, pid)
        self._refill()

    def _wait(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._lock:
            key = self._keys.pop(proc.pid)
            if self._procs.get(key) is proc:
                del self._procs[key]
        log.info(
            "event=process_exited job=%s worker=%s pid=%d code=%d", key[0], key[1], proc.pid, code
        )
        if not key[0]:
            self._refill(delay=WARM_RETRY_S)  # died while waiting: replace it, not in a loop
            return
        self._on_exit(Exited(key, code, proc.pid))

    def send(self, key: Key, message: dict) -> bool:
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

    def stop(self, key: Key, grace: float = STOP_GRACE_S) -> None:
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

    def kill(self, key: Key) -> None:
        """SIGKILL a process and everything it spawned (a hung process ignores SIGTERM)."""
        with self._lock:
            proc = self._procs.get(key)
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        with self._cond:
            self._closed = True  # no warm process replaces one stopped now
            self._cond.notify()
        self._spawner.join(timeout=grace)  # a process being started is then in _procs
        with self._lock:
            keys = list(self._procs)
        threads = [threading.Thread(target=self.stop, args=(k, grace)) for k in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
