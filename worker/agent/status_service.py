"""The agent's gRPC service: what it knows of the training processes it runs.

The controller asks it to confirm a survivor's report that a peer was lost
(:mod:`elasticd.server.controller.suspicion`): an agent that answers at all is
alive, and its answer says whether the process still runs. WorkerState is
read only. InjectFault (`elasticd chaos`) signals a supervised process or the
agent itself, and only on an agent started with ``--allow-chaos``
(:mod:`elasticd.worker.agent.fault_injection`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc

from elasticd.rpc import agent_pb2, agent_pb2_grpc
from elasticd.worker.agent.fault_injection import FaultExecutor, FaultRefused, plan_fault

CHAOS_OFF = "fault injection is off on this agent: start it with --allow-chaos to allow it"


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServicer):
    def __init__(
        self,
        worker_state: Callable[[str, str], tuple[str, int, int]],
        faults: FaultExecutor | None = None,
    ) -> None:
        self._worker_state = worker_state  # (job, worker) -> (state, pid, generation)
        self._faults = faults  # None: InjectFault is refused

    def WorkerState(self, request, context):
        state, pid, generation = self._worker_state(request.job_id, request.worker_id)
        return agent_pb2.WorkerStateReply(state=state, pid=pid, generation=generation)

    def InjectFault(self, request, context):
        if self._faults is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, CHAOS_OFF)
        try:
            order = plan_fault(
                request.job_id,
                request.worker_id,
                request.signal,
                request.resume_after_s,
                os.getpid(),
                lambda job, worker: self._worker_state(job, worker)[1],
            )
        except FaultRefused as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        self._faults.execute(order)
        return agent_pb2.InjectFaultReply(pid=order.pid, target=order.target)
