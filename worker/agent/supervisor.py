"""Start, watch and stop training processes. The supervisor never trains.

Each process gets its own process group (so a stop reaches everything it
spawned), a parent-death signal (so nothing outlives the agent, even when
the agent is SIGKILLed), its stdout and stderr in a log file the agent
opens, a pipe on stdin through which the agent sends it control messages as
JSON lines, and a socket back (descriptor ``ELASTICD_READY_FD``) on which it
says once that it has started and is ready to train. A process exit is seen
at once by a waiting thread, not by polling etcd.

What a process gets besides (its environment, user and working directory)
is the :class:`~.sandbox.Sandbox`'s. Warm processes belong to one job: they
start in its directory, import only its modules, and only a process of that
job takes one, so nothing one job's code did in an interpreter reaches
another job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from elasticd.logs import open_private_log
from elasticd.spawn import spawn
from elasticd.worker.agent.api import Exited, ProcessSpec
from elasticd.worker.agent.sandbox import Sandbox

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


READY_FD_ENV = "ELASTICD_READY_FD"
WARM_RETRY_S = 1.0  # a warm process that died idle is replaced after this long
# A warm process is started once the one just taken says it is ready, or after this
# long: starting an interpreter meanwhile would slow the one the job waits for.
WARM_REFILL_S = 10.0
PRELOADS_KEPT = 8  # task modules of a job its new warm processes import in advance

Key = tuple[str, str]  # (job id, worker id); a warm process: ("", "warm-<n>")


def warm_shares(jobs: list[str], live: dict[str, int], total: int) -> dict[str, int]:
    """How many warm processes each job gets: ``jobs`` most recent first, each as many
    as it runs processes here (at least one), until ``total`` are given out."""
    shares: dict[str, int] = {}
    for job in jobs:
        share = min(total, max(1, live.get(job, 0)))
        shares[job] = share
        total -= share
    return shares


class ProcessSupervisor:
    """Runs processes by key; keeps ``warm`` processes of ``warm_argv`` started in advance.

    A warm process is started before anybody needs it, for one job, and waits on
    its control pipe (a job's pool fills once its first such process is started).
    :meth:`start` of a spec of that job with the same command takes one instead of
    starting a new interpreter: it hands over the spec's log file (a descriptor,
    on the ready socket) and sends its environment (``{"adopt": ...}``) and then
    the first message; another warm process starts once that one says it is ready
    (or after WARM_REFILL_S). :meth:`preload` has a job's warm processes import a
    module before they are needed; :meth:`keep_jobs` drops the pools of jobs that
    left the node.
    """

    def __init__(
        self,
        on_exit: Callable[[Exited], None],
        on_ready: Callable[[Key, int], None] | None = None,
        warm: int = 0,
        warm_argv: tuple[str, ...] = (),
        warm_log_dir: str = "",
        sandbox: Sandbox | None = None,
    ) -> None:
        self._on_exit = on_exit
        self._on_ready = on_ready
        self._procs: dict[Key, subprocess.Popen] = {}
        self._keys: dict[int, Key] = {}  # pid -> whose process it is now
        self._lock = threading.Lock()
        self._warm = warm if warm_argv else 0
        self._warm_argv = warm_argv
        self._warm_log_dir = warm_log_dir
        self.sandbox = sandbox or Sandbox.unconfined(Path(warm_log_dir or ".") / "jobs")
        self._warm_started = 0  # names warm processes
        self._warm_job: dict[str, str] = {}  # warm process name -> its job (started or pending)
        self._jobs: list[str] = []  # jobs with a warm pool, most recently started first
        self._preloads: dict[str, list[str]] = {}  # job -> its modules to import in advance
        self._ready_socks: dict[int, socket.socket] = {}  # pid -> the agent's end
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

    def warm_pids(self, job_id: str | None = None) -> list[int]:
        """The warm processes waiting to be taken (of ``job_id`` only, if given)."""
        with self._lock:
            return [
                p.pid
                for k, p in self._procs.items()
                if not k[0] and job_id in (None, self._warm_job.get(k[1]))
            ]

    def start(self, spec: ProcessSpec, first_message: dict | None = None) -> int:
        """Start (or take a warm process of its job for) ``spec``; the first one of a
        job with ``warm_argv`` starts that job's warm pool, so a job that never runs
        such a process here gets none."""
        n = len(self._warm_argv)
        warmable = bool(n) and spec.argv[:n] == self._warm_argv and bool(self._warm)
        if warmable:
            with self._lock:
                self._jobs = [spec.job_id, *(j for j in self._jobs if j != spec.job_id)]
        proc = self._take_warm(spec) if warmable else None
        if proc is not None:
            self._hand_log(proc.pid, spec.log_path)
            # the rest of the command line: what a process started for ``spec`` would run
            adopt = {"env": spec.env, "argv": list(spec.argv[n:])}
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

    def preload(self, job_id: str, module: str) -> None:
        """Have ``job_id``'s warm processes, and those started later, import ``module`` now."""
        with self._lock:
            kept = self._preloads.get(job_id, [])
            if module in kept:
                return
            self._preloads[job_id] = [*kept, module][-PRELOADS_KEPT:]
            idle = [k for k in self._procs if not k[0] and self._warm_job.get(k[1]) == job_id]
        for key in idle:
            self.send(key, {"preload": [module]})

    def keep_jobs(self, job_ids: Iterable[str]) -> None:
        """Forget the warm pools of jobs not in ``job_ids`` (they left this node) and stop
        their warm processes."""
        keep = set(job_ids)
        with self._lock:
            self._jobs = [j for j in self._jobs if j in keep]
            self._preloads = {j: m for j, m in self._preloads.items() if j in keep}
        self._trim()

    def _take_warm(self, spec: ProcessSpec) -> subprocess.Popen | None:
        with self._lock:
            for key, proc in list(self._procs.items()):
                mine = self._warm_job.get(key[1]) == spec.job_id
                if not key[0] and mine and proc.poll() is None:
                    del self._procs[key]
                    del self._warm_job[key[1]]
                    self._procs[spec.key] = proc
                    self._keys[proc.pid] = spec.key
                    return proc
        return None

    def _hand_log(self, pid: int, path: str) -> None:
        """Give a warm process the log file it writes from now on, opened here: the
        process may run as a user who cannot open it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open_private_log(path) as logfile, self._lock:
            sock = self._ready_socks.get(pid)
            try:
                if sock is not None:
                    socket.send_fds(sock, [b"L"], [logfile.fileno()])
            except OSError as exc:  # it is gone: its exit is handled as any
                log.warning("event=log_handover_failed pid=%d error=%s", pid, exc)

    def _shares(self) -> dict[str, int]:
        with self._lock:
            live: dict[str, int] = {}
            for job, _ in self._procs:
                live[job] = live.get(job, 0) + 1
            return warm_shares(self._jobs, live, self._warm)

    def _trim(self) -> None:
        """Stop the idle warm processes beyond their job's share (or of a job gone)."""
        shares = self._shares()
        extra: list[subprocess.Popen] = []
        with self._lock:
            kept: dict[str, int] = {}
            for key, proc in list(self._procs.items()):
                job = self._warm_job.get(key[1], "")
                if key[0] or not job:
                    continue
                kept[job] = kept.get(job, 0) + 1
                if kept[job] > shares.get(job, 0):
                    # Out of the pool before it is killed: a launch meanwhile cannot take it.
                    del self._procs[key]
                    extra.append(proc)
        for proc in extra:
            _signal_group(proc, signal.SIGKILL)

    def _refill(self, delay: float = 0.0) -> None:
        """Start warm processes until each job has its share waiting (after ``delay`` s)."""
        if delay:
            timer = threading.Timer(delay, self._refill)
            timer.daemon = True
            timer.start()
            return
        self._trim()
        shares = self._shares()
        with self._cond:
            if self._closed:
                return
            with self._lock:
                have: dict[str, int] = {}
                for job in self._warm_job.values():  # waiting or being started
                    have[job] = have.get(job, 0) + 1
            for job, share in shares.items():
                for _ in range(max(share - have.get(job, 0), 0)):
                    self._warm_started += 1
                    name = f"warm-{self._warm_started}"
                    path = os.path.join(self._warm_log_dir, f"{name}.log")
                    spec = ProcessSpec("", name, self._warm_argv, {"PYTHONUNBUFFERED": "1"}, path)
                    with self._lock:
                        self._warm_job[name] = job
                    self._requests.append((spec, None, []))
            self._cond.notify()

    def _spawn_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requests or self._closed)
                if self._closed and not self._requests:
                    return
                spec, done, box = self._requests.pop(0)
            if done is None and (self._closed or not self._wanted(spec.worker_id)):
                continue  # no new warm process once stopping, nor for a job gone
            try:
                box.append(self._spawn(spec))
            except OSError as exc:
                box.append(exc)
                if done is None:
                    with self._lock:
                        self._warm_job.pop(spec.worker_id, None)
                    log.error("event=warm_start_failed error=%s", exc)
            if done is not None:
                done.set()

    def _wanted(self, warm_name: str) -> bool:
        """Whether the warm process ``warm_name``, about to start, is still wanted."""
        with self._lock:
            if self._warm_job.get(warm_name) in self._jobs:
                return True
            self._warm_job.pop(warm_name, None)
            return False

    def _spawn(self, spec: ProcessSpec) -> subprocess.Popen:
        warm = not spec.job_id
        job_id = self._warm_job.get(spec.worker_id, "") if warm else spec.job_id
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        logfile = open_private_log(spec.log_path)  # owned by the child
        ready, theirs = socket.socketpair()
        run_as = self.sandbox.run_as
        try:
            proc = spawn(
                spec.argv,
                user=(run_as.uid, run_as.gid) if run_as is not None else None,
                env={**self.sandbox.environment, **spec.env, READY_FD_ENV: str(theirs.fileno())},
                cwd=self.sandbox.job_dir(job_id) if job_id else None,
                stdin=subprocess.PIPE,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ready.close()
            raise
        finally:
            logfile.close()
            theirs.close()
        with self._lock:
            self._procs[spec.key] = proc
            self._keys[proc.pid] = spec.key
            self._ready_socks[proc.pid] = ready
            preloads = list(self._preloads.get(job_id, ())) if warm else []
        if warm:  # it warms up while it waits: a launched process has no time to spare
            self.send(spec.key, {"warm": True, "preload": preloads})
        threading.Thread(target=self._wait, args=(proc,), daemon=True).start()
        threading.Thread(target=self._await_ready, args=(proc.pid, ready), daemon=True).start()
        log.info("event=process_started job=%s worker=%s pid=%d", job_id, spec.worker_id, proc.pid)
        return proc

    def _await_ready(self, pid: int, sock: socket.socket) -> None:
        """Tell ``on_ready`` when the process writes its ready line (EOF: it never will)."""
        line = b""
        try:
            # at most a line's worth: the process runs user code, which may write anything
            while len(line) < 64 and not line.endswith(b"\n") and (data := sock.recv(64)):
                line += data
        except OSError:
            pass
        with self._lock:
            self._ready_socks.pop(pid, None)
            key = self._keys.get(pid)
        sock.close()
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
            if not key[0]:
                self._warm_job.pop(key[1], None)
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

    def stop(self, key: Key, grace: float = STOP_GRACE_S, pid: int | None = None) -> None:
        """Stop ``key``'s process (only if it is still ``pid``, when given: one started for
        the same key meanwhile is not the one meant)."""
        with self._lock:
            proc = self._procs.get(key)
        if proc is None or (pid is not None and proc.pid != pid):
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
