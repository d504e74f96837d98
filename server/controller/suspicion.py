"""A survivor's word that a peer is lost, checked with the peer's agent first.

A node that dies takes its lease with it only when the lease expires (the TTL,
5 s by default). Its peers see it sooner: their collective breaks. A survivor
names the peers it lost (``ReportPeerLost``); the controller asks each one's
agent (``NodeAgent.WorkerState``) with a short deadline. An agent that does not
answer is taken for dead: its node is left out of every job's next generation
at once, for as long as that registration stands (at most ``hold_s``; a new
agent registers a new address). An agent that answers is alive, whatever the
survivor saw, so a false report removes nobody; if its process is gone, the
agent reports that itself.

The validation is a pure function; :class:`PeerSuspicions` is the memory of
confirmed nodes and the one place that calls agents.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc

from elasticd.membership import Generation, NodeInfo
from elasticd.rpc import agent_pb2, agent_pb2_grpc
from elasticd.security.channels import open_channel
from elasticd.server.controller.planning import ClusterSnapshot

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 1.0  # an agent that does not answer within this is taken for dead
HOLD_S = 10.0  # a confirmed node stays out at most this long unless it re-registers (2 TTLs)
_DEAD = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class BadPeerReport(ValueError):
    """The report does not name members of the generation it is about."""


class StalePeerReport(ValueError):
    """The report is about a generation that is no longer the job's newest."""


def suspects_of(
    gen: Generation | None, generation: int, reporter: str, suspects: list[str]
) -> list[str]:
    """The members a report names, checked against the job's newest generation."""
    if gen is None or generation != gen.number:
        newest = gen.number if gen else 0
        raise StalePeerReport(f"generation {generation} is not the job's newest ({newest})")
    members = gen.worker_ids
    if reporter not in members:
        raise BadPeerReport(f"{reporter!r} is not a member of generation {generation}")
    if not suspects:
        raise BadPeerReport("a report names at least one suspect")
    strangers = sorted(set(suspects) - members)
    if strangers:
        raise BadPeerReport(f"{strangers} are not members of generation {generation}")
    if reporter in suspects:
        raise BadPeerReport("a worker cannot report itself lost")
    return sorted(set(suspects))


class PeerSuspicions:
    def __init__(self, confirm_timeout_s: float = CONFIRM_TIMEOUT_S, hold_s: float = HOLD_S):
        self.confirm_timeout_s, self.hold_s = confirm_timeout_s, hold_s
        self._lock = threading.Lock()
        self._dead: dict[str, tuple[str, float]] = {}  # node -> (its agent address, when)

    def confirm(
        self, job_id: str, suspects: Mapping[str, str], nodes: Mapping[str, NodeInfo]
    ) -> tuple[list[str], list[str]]:
        """Ask the agents of ``suspects`` (worker -> node); (confirmed, healthy) workers."""

        def dead(worker: str) -> bool:
            info = nodes.get(suspects[worker])
            if info is None:
                return False  # its lease expired already: the seal needs no help
            if not info.agent_address:
                return False  # an agent without the service: nothing can confirm it
            with open_channel(info.agent_address) as channel:
                try:
                    agent_pb2_grpc.NodeAgentStub(channel).WorkerState(
                        agent_pb2.WorkerStateRequest(job_id=job_id, worker_id=worker),
                        timeout=self.confirm_timeout_s,
                    )
                except grpc.RpcError as exc:
                    return exc.code() in _DEAD
            return False

        workers = sorted(suspects)
        with ThreadPoolExecutor(max(len(workers), 1), thread_name_prefix="confirm") as pool:
            verdicts = dict(zip(workers, pool.map(dead, workers), strict=True))
        confirmed = [w for w in workers if verdicts[w]]
        now = time.monotonic()
        with self._lock:
            for w in confirmed:
                self._dead[suspects[w]] = (nodes[suspects[w]].agent_address, now)
        return confirmed, [w for w in workers if not verdicts[w]]

    def without_dead(self, cluster: ClusterSnapshot) -> ClusterSnapshot:
        """``cluster`` less the nodes confirmed dead (while their registration stands)."""
        now = time.monotonic()
        with self._lock:
            for node, (address, at) in list(self._dead.items()):
                info = cluster.nodes.get(node)
                if info is None or info.agent_address != address or now - at > self.hold_s:
                    del self._dead[node]  # gone, registered anew, or held long enough
            dead = set(self._dead)
        if not dead:
            return cluster
        return replace(cluster, nodes={n: i for n, i in cluster.nodes.items() if n not in dead})


def peer_lost(
    controller, job_id: str, generation: int, reporter: str, suspects: list[str]
) -> tuple[list[str], list[str]]:
    """Check a survivor's report with the suspects' agents; (confirmed, healthy).

    A confirmed node is left out from the next reconcile pass on, at once
    (departures never wait for the join window).
    """
    controller.require_leader()
    snap = controller.snapshot(job_id)  # JobNotFound for an unknown job
    gen = snap.generation
    named = suspects_of(gen, generation, reporter, suspects)
    nodes_of = {m.worker_id: m.node_id for m in gen.members}
    confirmed, healthy = controller.suspicions.confirm(
        job_id, {w: nodes_of[w] for w in named}, controller.view.cluster().nodes
    )
    log.info(
        "event=peer_report job=%s generation=%d reporter=%s confirmed=%s healthy=%s",
        job_id,
        generation,
        reporter,
        ",".join(confirmed) or "-",
        ",".join(healthy) or "-",
    )
    if confirmed:
        controller.wake()
    return confirmed, healthy
