"""The gRPC client of the job service, as used by the CLI and by programs.

The client finds the leading controller through etcd (the value the leader
published in its election key) unless given an address, and follows a
leader change: a call refused with UNAVAILABLE is retried against whoever
leads now, with backoff, up to ``retry_deadline_s``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from elasticd.coord.election import observe_leader
from elasticd.coord.etcd import EtcdClient, EtcdError
from elasticd.coord.keys import DEFAULT_PREFIX, Keys
from elasticd.jobspec import load_spec_yaml
from elasticd.retry import Backoff
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.security.channels import open_channel
from elasticd.security.config import Security, current

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")
CALL_TIMEOUT_S = 30.0
# Cancel and CheckpointJob wait for a checkpoint to be written (a cancel keeps the job's last
# state first): minutes for a large model on slow storage.
CHECKPOINT_CALL_TIMEOUT_S = 600.0
RETRY_DEADLINE_S = 30.0  # how long a call follows a controller fail-over
# A watch stream that ends with these is opened again: the controller went away or
# stopped leading (a stream cut by a dying server ends UNAVAILABLE or CANCELLED).
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class Unreachable(ConnectionError):
    """Neither etcd nor a leading controller answers; the message names what was tried."""


class JobClient:
    def __init__(
        self,
        controller: str | None = None,
        etcd: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        retry_deadline_s: float = RETRY_DEADLINE_S,
        security: Security | None = None,
    ) -> None:
        if controller is None and etcd is None:
            raise ValueError("give a controller address or etcd endpoints to find one")
        self.security = current() if security is None else security
        self._fixed = controller
        self.etcd_endpoints = etcd or ""
        self._etcd = EtcdClient(etcd, security=self.security) if etcd else None
        self._keys = Keys(prefix)
        self._retry_deadline = retry_deadline_s
        self._channel: grpc.Channel | None = None
        self._address = ""

    def _stub(self) -> job_pb2_grpc.JobServiceStub:
        address = self._fixed or self._leader()
        if address != self._address or self._channel is None:
            if self._channel is not None:
                self._channel.close()
            self._channel = open_channel(address, self.security, caller="user")
            self._address = address
        return job_pb2_grpc.JobServiceStub(self._channel)

    @property
    def address(self) -> str:
        """The controller this client talks to now ("" before the first call)."""
        return self._fixed or self._address

    def _leader(self) -> str:
        assert self._etcd is not None
        try:
            value = observe_leader(self._etcd, self._keys.election)
        except EtcdError as exc:
            raise Unreachable(
                f"cannot reach etcd at {self.etcd_endpoints} to find the controller: {exc}"
            ) from exc
        if value is None:
            raise Unreachable(
                f"no controller is leading under {self._keys.prefix!r} in etcd at "
                f"{self.etcd_endpoints} (is `elasticd controller` running?)"
            )
        return value.decode()

    def _call(self, method: str, request, timeout: float = CALL_TIMEOUT_S):
        backoff = Backoff(initial=0.2, maximum=2.0, deadline=self._retry_deadline)
        while True:
            try:
                return getattr(self._stub(), method)(request, timeout=timeout)
            except (grpc.RpcError, ConnectionError) as exc:
                code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                if code != grpc.StatusCode.UNAVAILABLE or not backoff.sleep():
                    raise
                self._address = ""  # ask etcd who leads now

    def submit_yaml(self, text: str, base_dir: str = "", resume_from: str = "") -> str:
        """Submit a spec; ``resume_from`` (a job id or checkpoint URL) starts it from there."""
        request = job_pb2.SubmitJobRequest(
            spec_yaml=text, base_dir=base_dir, resume_from=resume_from
        )
        return self._call("SubmitJob", request).job_id

    def submit_file(self, path: str, resume_from: str = "") -> str:
        """Submit a spec file; it is validated here first so errors name the field at once."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        base_dir = os.path.dirname(os.path.abspath(path))
        load_spec_yaml(text, base_dir)
        return self.submit_yaml(text, base_dir, resume_from)

    def get(self, job_id: str) -> job_pb2.JobStatus:
        return self._call("GetJob", job_pb2.GetJobRequest(job_id=job_id))

    def list(
        self, states: Iterable[str] = (), name: str = "", mode: str = "", owner: str = ""
    ) -> list[job_pb2.JobStatus]:
        """Every job, or those that match all the filters given."""
        request = job_pb2.ListJobsRequest(states=list(states), name=name, mode=mode, owner=owner)
        return list(self._call("ListJobs", request).jobs)

    def scale(self, job_id: str, min_workers: int, max_workers: int) -> job_pb2.JobStatus:
        request = job_pb2.ScaleJobRequest(
            job_id=job_id, min_workers=min_workers, max_workers=max_workers
        )
        return self._call("ScaleJob", request)

    def watch(self, job_id: str) -> Iterator[job_pb2.JobStatus]:
        """The job's status now and on every change, until it has ended.

        Follows a controller fail-over: a stream that breaks (the controller died or
        stopped leading) is opened again at whoever leads, for up to
        ``retry_deadline_s`` without an answer. A status seen before is not repeated.
        """
        backoff = None  # a new one (with a new deadline) for every break
        last = None
        while True:
            code = grpc.StatusCode.UNAVAILABLE  # a stream that ended before the job did
            try:
                for status in self._stub().WatchJob(job_pb2.WatchJobRequest(job_id=job_id)):
                    backoff = None
                    if status != last:
                        yield status
                        last = status
                    if status.state in TERMINAL_STATES:
                        return
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RECONNECT_CODES:
                    raise
            except ConnectionError:
                pass  # etcd, or a leader, not there yet: try again within the deadline
            if backoff is None:
                backoff = Backoff(initial=0.2, maximum=2.0, deadline=self._retry_deadline)
            if not backoff.sleep():
                raise Unreachable(
                    f"watch of job {job_id}: no leading controller answered for "
                    f"{self._retry_deadline:g}s (last tried {self.address or self.etcd_endpoints}, "
                    f"{code.name})"
                )
            self._address = ""  # ask etcd who leads now

    def cancel(self, job_id: str) -> job_pb2.JobStatus:
        return self._call(
            "CancelJob", job_pb2.CancelJobRequest(job_id=job_id), CHECKPOINT_CALL_TIMEOUT_S
        )

    def checkpoint(self, job_id: str) -> job_pb2.JobStatus:
        """Checkpoint a running job now; the status names the new checkpoint."""
        return self._call(
            "CheckpointJob", job_pb2.CheckpointJobRequest(job_id=job_id), CHECKPOINT_CALL_TIMEOUT_S
        )

    def switch(self, job_id: str, mode: str) -> job_pb2.JobStatus:
        return self._call("SwitchMode", job_pb2.SwitchModeRequest(job_id=job_id, mode=mode))

    def wait(
        self,
        job_id: str,
        timeout: float,
        on_update: Callable[[job_pb2.JobStatus], None] | None = None,
        interval: float = 1.0,
    ) -> job_pb2.JobStatus:
        """Poll until the job ends or ``timeout``; ``on_update`` sees every status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.get(job_id)
            if on_update is not None:
                on_update(status)
            if status.state in TERMINAL_STATES:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout}s")
            time.sleep(interval)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._etcd is not None:
            self._etcd.close()


def format_status(s: job_pb2.JobStatus) -> str:
    loss = "-" if s.loss != s.loss else f"{s.loss:.4f}"
    workers = len(s.workers)
    # A script counts its own steps: elasticd shows how often its processes restarted.
    progress = f"step={s.step}/{s.total_steps}" if s.total_steps else f"restarts={s.restarts}"
    line = (
        f"{s.job_id}  {s.state:<9} mode={s.mode} gen={s.generation} workers={workers} "
        f"{progress} loss={loss}"
    )
    if s.samples_per_s:
        line += f" samples/s={s.samples_per_s:.1f}"
    if s.ps:
        line += " ps=" + ",".join(
            f"{h.ps_id}:{h.bytes}B" + (f"({h.backup_bytes}B backup)" if h.backup_bytes else "")
            for h in s.ps
        )
    if s.checkpoint:
        line += f" checkpoint={s.checkpoint}"
    if s.restored_from:
        line += f" restored_from={s.restored_from} (step {s.restored_step}"
        line += f", {s.updates_lost} updates lost)"
    if s.message and s.state not in ("RUNNING", "COMPLETED"):
        line += f"  ({s.message})"
    return line
