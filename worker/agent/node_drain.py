"""Draining this node: the effects of a graceful drain (:mod:`.drain` says what and why).

:func:`drain` marks the node draining, then reconciles, which stops each
process its job no longer lists, until :func:`.drain.next_step` says to leave
or to stop what is left. It waits for the controller only while one leads:
without a leader nobody can seal the generation without this node.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from elasticd.coord.election import observe_leader
from elasticd.coord.etcd import EtcdClient, EtcdError
from elasticd.coord.keys import Keys
from elasticd.worker.agent.drain import DrainStep, DrainView, Leave, StopNow, next_step

if TYPE_CHECKING:
    from elasticd.worker.agent.agent import NodeAgent

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0  # how long the controller gets to take the workers out (--drain-timeout)
DRAIN_POLL_S = 0.2  # how often the agent looks again while it waits


def leader_present(client: EtcdClient, keys: Keys) -> bool:
    """Whether a controller leads (somebody can seal the drain's generation)."""
    return observe_leader(client, keys.election) is not None


def drain(agent: NodeAgent, timeout_s: float = DRAIN_TIMEOUT_S) -> DrainStep:
    """Drain ``agent``'s node; returns how it ended (Leave, or StopNow with what still runs).

    The caller then shuts the agent down, which stops what still runs and
    revokes its lease.
    """
    agent.mark_draining()
    log.info("event=drain_started node=%s timeout_s=%g", agent.node_id, timeout_s)
    began = time.monotonic()
    while True:
        try:
            agent.reconcile()  # stops each process its job no longer lists
            leader = leader_present(agent.client, agent.keys)
        except EtcdError as exc:
            log.warning("event=drain_etcd_error node=%s error=%s", agent.node_id, exc)
            leader = True  # unknown: wait for the controller until the timeout
        elapsed = time.monotonic() - began
        running = frozenset(agent.supervisor.running())
        step = next_step(DrainView(running, elapsed, timeout_s if leader else 0.0))
        if isinstance(step, Leave):
            log.info("event=drained node=%s elapsed_s=%.1f", agent.node_id, elapsed)
            return step
        if isinstance(step, StopNow):
            log.warning(
                "event=drain_timed_out node=%s elapsed_s=%.1f leader=%s workers=%s",
                agent.node_id,
                elapsed,
                leader,
                ",".join(sorted(f"{job}/{worker}" for job, worker in step.workers)),
            )
            return step
        agent.wait_for_change(DRAIN_POLL_S)
