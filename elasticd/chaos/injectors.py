"""How a fault reaches its process: a local signal, or an agent's InjectFault RPC.

Both keep a list of what they stopped, and :meth:`resume_all` sends SIGCONT
to every process still stopped: the runner calls it on every way out, so no
process stays stopped after `elasticd chaos` ends. Through agents a stop also
carries ``resume_after_s``, so the agent resumes it even if this process dies.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from elasticd.chaos.schedule import Fault
from elasticd.chaos.targets import ClusterView, LocalResolver
from elasticd.rpc import agent_pb2, agent_pb2_grpc
from elasticd.security.channels import open_channel

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0


@dataclass
class Injection:
    """A fault as it happened: when (monotonic seconds), to which pid, and when resumed."""

    fault: Fault
    at: float
    pid: int = 0
    skipped: str = ""  # why nothing was signalled
    resumed_at: float | None = None
    handle: dict = field(default_factory=dict)  # what the injector needs to resume it

    @property
    def stopped(self) -> bool:
        return self.fault.kind.action == "stop" and not self.skipped and self.resumed_at is None


class Injector(Protocol):
    def inject(self, fault: Fault) -> Injection: ...

    def resume(self, injection: Injection) -> None: ...


def resume_all(injector: Injector, injections: list[Injection]) -> None:
    for injection in injections:
        if injection.stopped:
            try:
                injector.resume(injection)
            except Exception as exc:  # keep resuming the others
                log.error("event=chaos_resume_failed pid=%d error=%s", injection.pid, exc)


class LocalInjector:
    """Signals pids on this machine (a cluster started by ``elasticd up``)."""

    def __init__(self, resolver: LocalResolver) -> None:
        self.resolver = resolver

    def inject(self, fault: Fault) -> Injection:
        pid = self.resolver.pid_of(fault.kind.role, fault.target)
        now = time.monotonic()
        if not pid:
            return Injection(fault, now, skipped=f"{fault.target} is not running")
        try:
            os.kill(pid, getattr(signal, fault.kind.signal))
        except ProcessLookupError:
            return Injection(fault, now, pid, skipped=f"{fault.target} exited")
        return Injection(fault, now, pid)

    def resume(self, injection: Injection) -> None:
        try:
            os.kill(injection.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        injection.resumed_at = time.monotonic()


class AgentInjector:
    """Asks agents (started with ``--allow-chaos``) to signal their workers or themselves."""

    def __init__(self, view: ClusterView, job_id: str) -> None:
        self.view = view
        self.job_id = job_id

    def _call(
        self, address: str, request: agent_pb2.InjectFaultRequest
    ) -> agent_pb2.InjectFaultReply:
        with open_channel(address) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            return stub.InjectFault(request, timeout=RPC_TIMEOUT_S)

    def _route(self, fault: Fault) -> tuple[str, str]:
        """(agent address, worker id or "") of a fault; ("", why) when it has none."""
        nodes = self.view.nodes()
        if fault.kind.role == "agent":
            node, worker = fault.target, ""
        else:
            report = self.view.workers(self.job_id).get(fault.target)
            if report is None:
                return "", f"{fault.target} is not running"
            node, worker = report.node_id, fault.target
        info = nodes.get(node)
        if info is None or not info.agent_address:
            return "", f"agent {node} is not registered"
        return info.agent_address, worker

    def inject(self, fault: Fault) -> Injection:
        address, worker = self._route(fault)
        now = time.monotonic()
        if not address:
            return Injection(fault, now, skipped=worker)
        request = agent_pb2.InjectFaultRequest(
            job_id=self.job_id if worker else "",
            worker_id=worker,
            signal=fault.kind.signal,
            resume_after_s=fault.stop_s,
        )
        try:
            reply = self._call(address, request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise  # the whole run is pointless: say so at once
            return Injection(fault, now, skipped=f"{exc.code().name}: {exc.details()}")
        return Injection(fault, now, reply.pid, handle={"address": address, "worker": worker})

    def resume(self, injection: Injection) -> None:
        worker = injection.handle.get("worker", "")
        if worker:  # a stopped agent cannot answer; its resumer wakes it
            request = agent_pb2.InjectFaultRequest(
                job_id=self.job_id, worker_id=worker, signal="SIGCONT"
            )
            try:
                self._call(injection.handle["address"], request)
            except grpc.RpcError as exc:
                log.info("event=chaos_resume_refused worker=%s error=%s", worker, exc.code().name)
        injection.resumed_at = time.monotonic()
