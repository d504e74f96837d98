"""The agent's gRPC service: what it knows of the training processes it runs.

The controller asks it to confirm a survivor's report that a peer was lost
(:mod:`elasticd.server.controller.suspicion`): an agent that answers at all is
alive, and its answer says whether the process still runs. Read only; it
never starts or stops anything.
"""

from __future__ import annotations

from collections.abc import Callable

from elasticd.rpc import agent_pb2, agent_pb2_grpc


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServicer):
    def __init__(self, worker_state: Callable[[str, str], tuple[str, int, int]]) -> None:
        self._worker_state = worker_state  # (job, worker) -> (state, pid, generation)

    def WorkerState(self, request, context):
        state, pid, generation = self._worker_state(request.job_id, request.worker_id)
        return agent_pb2.WorkerStateReply(state=state, pid=pid, generation=generation)
