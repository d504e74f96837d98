"""Samples of a job while it runs: step, loss, generation, workers, PS, leader.

A background thread asks the leading controller for the job (GetJob) every
``interval_s`` and reads the workers' reports in etcd (their pid and restart
count). Every call has a short timeout, so a stopped controller or etcd
costs samples, not the observer: a sample the controller did not answer is
kept with ``reachable=False``, which is itself a sign the fault was seen.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import grpc

from elasticd.chaos.targets import ClusterView
from elasticd.coord.etcd import EtcdError
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.security.channels import open_channel

SAMPLE_INTERVAL_S = 0.15
CALL_TIMEOUT_S = 1.0  # one sample never waits longer than this on one server
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    state: str  # as reported; GONE when its agent's report vanished
    pid: int = 0
    restarts: int = 0


@dataclass(frozen=True)
class Sample:
    """The job at monotonic time ``t``."""

    t: float
    reachable: bool
    state: str = ""
    step: int = 0
    loss: float = math.nan
    generation: int = 0
    workers: tuple[WorkerView, ...] = ()
    ps: tuple[str, ...] = ()
    leader: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def merge_workers(
    listed: dict[str, str], reports: dict[str, tuple[str, int, int]]
) -> tuple[WorkerView, ...]:
    """Workers GetJob lists (id → state) joined with agents' reports (id → state, pid, restarts)."""
    views = []
    for wid in sorted(set(listed) | set(reports)):
        if wid in reports:
            state, pid, restarts = reports[wid]
            views.append(WorkerView(wid, state, pid, restarts))
        else:
            views.append(WorkerView(wid, "GONE"))
    return tuple(views)


class JobObserver:
    def __init__(
        self, view: ClusterView, job_id: str, interval_s: float = SAMPLE_INTERVAL_S
    ) -> None:
        self.view = view
        self.job_id = job_id
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-observer", daemon=True)
        self._address = ""
        self._channel: grpc.Channel | None = None
        self._reports: dict[str, tuple[str, int, int]] = {}

    def start(self) -> JobObserver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * CALL_TIMEOUT_S)
        if self._channel is not None:
            self._channel.close()

    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            with self._lock:
                self.samples.append(sample)
            if sample.terminal:
                return
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - sample.t)))

    def sample(self) -> Sample:
        t = time.monotonic()
        try:
            self._reports = {
                w: (r.state, r.pid, r.restarts) for w, r in self.view.workers(self.job_id).items()
            }
        except EtcdError:
            pass  # etcd did not answer: the last reports stand
        status = self._get_job()
        if status is None:
            return Sample(t, reachable=False, leader=self._address)
        return Sample(
            t,
            reachable=True,
            state=status.state,
            step=status.step,
            loss=status.loss,
            generation=status.generation,
            workers=merge_workers({w.worker_id: w.state for w in status.workers}, self._reports),
            ps=tuple(sorted(h.ps_id for h in status.ps)),
            leader=self._address,
        )

    def _get_job(self) -> job_pb2.JobStatus | None:
        for _ in range(2):  # the second time at whoever leads now
            if not self._address:
                self._connect(self.view.leader_address())
                if not self._address:
                    return None
            stub = job_pb2_grpc.JobServiceStub(self._channel)
            try:
                return stub.GetJob(
                    job_pb2.GetJobRequest(job_id=self.job_id), timeout=CALL_TIMEOUT_S
                )
            except grpc.RpcError:
                self._address = ""
        return None

    def _connect(self, address: str) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._address = address
        if address:
            self._channel = open_channel(address, caller="user")
