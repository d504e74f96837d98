"""The controller's side of the probe: ask for a task's shapes, get them or a TaskError.

:class:`ShapeProbe` starts the probe process (``python -m
elasticd.shape_probe``) on first use, in its own process group and tied to
this process's life (:func:`elasticd.spawn.spawn`), and keeps it for the
next questions: it pays ``import torch`` once, each question only a fork and
the task's own import. Several questions may be in flight at once; each
waits for its own reply. A probe process that died or stopped answering is
killed and started again on the next question.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from elasticd.placement import TensorSpec
from elasticd.security.config import Security
from elasticd.security.confinement import RunAs, training_environment
from elasticd.shape_probe.limits import (
    LOG_TAIL,
    MIN_MEMORY_MIB,
    PROBE_MEMORY_MIB,
    PROBE_TIMEOUT_S,
    RESULT_LIMIT,
)
from elasticd.shape_probe.outcome import shapes_from_reply
from elasticd.spawn import spawn

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # the probe process's own start: one `import torch`
REPLY_GRACE_S = 30.0  # beyond the timeout, before a silent probe process is given up
_MAX_REPLY = 8 * (RESULT_LIMIT + LOG_TAIL)  # JSON escaping can grow a reply this much


__all__ = ["PROBE_MEMORY_MIB", "PROBE_TIMEOUT_S", "ProbeUnavailable", "ShapeProbe"]


class ProbeUnavailable(ConnectionError):
    """The probe process is not answering (not the task's fault): try again."""


def probe_environment(run_as: RunAs | None) -> dict[str, str]:
    """The task runs in there: it gets the allow-listed environment and none of the
    controller's settings (the cluster token, key paths, etcd password), which would
    make it a cluster member; it calls no service, so not even the CA."""
    env = training_environment(os.environ, Security(), run_as=run_as)
    env = {k: v for k, v in env.items() if not k.startswith("ELASTICD_")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


class _ProbeProcess:
    def __init__(self, timeout_s: float, memory_mib: int, run_as: RunAs | None = None) -> None:
        # -P: the controller's working directory is not on the probe's sys.path
        argv = [sys.executable, *(("-P",) if sys.version_info >= (3, 11) else ()), "-m"]
        argv += ["elasticd.shape_probe", "--timeout", f"{timeout_s:g}"]
        argv += ["--memory-mib", str(memory_mib)]
        user = (run_as.uid, run_as.gid) if run_as is not None else None
        self.proc = spawn(
            argv,
            user=user,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=probe_environment(run_as),
            cwd=run_as.home if run_as is not None and os.path.isdir(run_as.home) else "/",
        )
        self.ready = threading.Event()
        self.alive = True
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="shape-probe-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while line := self.proc.stdout.readline(_MAX_REPLY):
                reply = json.loads(line)
                if reply.get("ready"):
                    self.ready.set()
                    continue
                with self._lock:
                    future = self._pending.pop(reply.get("id"), None)
                if future is not None:
                    future.set_result(reply)
        except (ValueError, OSError) as exc:
            log.warning("event=shape_probe_bad_reply error=%s", exc)
        finally:
            self.kill()

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        future: Future = Future()
        with self._lock:
            if not self.alive:
                raise ProbeUnavailable("the task probe process exited; submit again")
            request_id = next(self._ids)
            self._pending[request_id] = future
            try:
                self.proc.stdin.write(json.dumps({**request, "id": request_id}).encode() + b"\n")
                self.proc.stdin.flush()
            except OSError as exc:
                self._pending.pop(request_id, None)
                raise ProbeUnavailable(f"the task probe process is gone: {exc}") from None
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            log.warning("event=shape_probe_silent pid=%d", self.proc.pid)
            self.kill()
            raise ProbeUnavailable("the task probe process stopped answering") from None

    def kill(self) -> None:
        with self._lock:
            self.alive = False
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            if not future.done():
                future.set_exception(ProbeUnavailable("the task probe process exited"))
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class ShapeProbe:
    """Learns a task's parameter shapes in a sandboxed process, never in this one."""

    def __init__(
        self,
        timeout_s: float = PROBE_TIMEOUT_S,
        memory_mib: int = PROBE_MEMORY_MIB,
        run_as: RunAs | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"probe timeout must be positive, got {timeout_s}")
        if memory_mib < MIN_MEMORY_MIB:
            raise ValueError(
                f"probe memory must be at least {MIN_MEMORY_MIB} MiB, got {memory_mib}"
            )
        self.timeout_s = timeout_s
        self.memory_mib = memory_mib
        self.run_as = run_as  # the unprivileged user the probe runs as (None: ours)
        self._lock = threading.Lock()
        self._process: _ProbeProcess | None = None
        self.probes = 0  # questions asked (read by tests and logs)

    def start(self) -> _ProbeProcess:
        """Start the probe process unless it runs; do not wait for it to be ready.

        A leading controller starts it as it takes over, so that the first
        submit finds torch imported instead of waiting for it."""
        with self._lock:
            if self._process is None or not self._process.alive:
                self._process = _ProbeProcess(self.timeout_s, self.memory_mib, self.run_as)
                log.info("event=shape_probe_started pid=%d", self._process.proc.pid)
            return self._process

    def _running(self) -> _ProbeProcess:
        process = self.start()
        if not process.ready.wait(START_TIMEOUT_S) or not process.alive:
            process.kill()
            raise ProbeUnavailable("the task probe process did not start")
        return process

    def shapes(
        self, task: str, batch_size: int, seed: int, task_args: dict[str, Any] | None = None
    ) -> list[TensorSpec]:
        """The task's parameters (name, dtype, shape). Raises TaskError for a task that
        cannot be imported or built, ProbeUnavailable when the probe itself failed."""
        args = dict(task_args or {})
        request = {"task": task, "batch_size": batch_size, "seed": seed, "task_args": args}
        self.probes += 1
        reply = self._running().ask(request, self.timeout_s + REPLY_GRACE_S)
        return shapes_from_reply(reply, task, args, self.timeout_s, self.memory_mib)

    def close(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            process.kill()
