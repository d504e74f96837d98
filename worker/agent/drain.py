"""Graceful drain of a node: its workers leave the jobs at a generation boundary.

A drain starts on SIGTERM (``systemctl stop``, a Kubernetes pod deletion) or
on a drain request in etcd (``elasticd agent --drain``, see
:mod:`elasticd.worker.agent.drain_request`). The agent then

1. advertises its node as draining (``NodeInfo.draining``), on its lease as
   before: the controller chooses no worker on a draining node
   (``server/controller/planning.py: decide``), so it seals, at once, a new
   generation without this node's workers (a departure, ARCHITECTURE invariant
   9). The survivors adopt it at their next step boundary; the departed
   workers' unfinished data ranges go back to the queue, and a batch they
   applied already is refused as a duplicate when it is leased again, so no
   batch is lost or applied twice;
2. launches nothing more, and stops each of its processes once the controller
   has taken it out of its job (its assignment no longer lists it): a process
   that is no longer a member is fenced from the new generation anyway;
3. exits 0 once it holds no process, revoking its lease.

If the controller does not take the workers out within the drain timeout (no
leader, etcd unreachable), the agent stops them anyway and exits: revoking its
lease then tells the controller, as a dead node would.

:func:`next_step` is the decision, a plain function of a :class:`DrainView`;
:func:`drain` applies it to a :class:`~elasticd.worker.agent.agent.NodeAgent`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elasticd.coord.etcd import EtcdError

if TYPE_CHECKING:
    from elasticd.worker.agent.agent import NodeAgent

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0  # how long the controller gets to take the workers out (--drain-timeout)
DRAIN_POLL_S = 0.2  # how often the agent looks again while it waits


@dataclass(frozen=True)
class DrainView:
    """What the draining agent sees now."""

    running: frozenset[tuple[str, str]]  # (job, worker) of the processes still alive
    elapsed_s: float  # since the drain began
    timeout_s: float  # 0 when no controller leads: nobody can seal, so nothing to wait for


@dataclass(frozen=True)
class AwaitSeal:
    """Processes still run (the controller has not taken them out, or they are
    stopping): go on reconciling, which stops each one its job no longer lists."""

    workers: frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Leave:
    """Nothing runs any more: revoke the lease and exit 0."""


@dataclass(frozen=True)
class StopNow:
    """The drain timed out: stop these processes anyway, then leave."""

    workers: frozenset[tuple[str, str]]


DrainStep = AwaitSeal | Leave | StopNow


def next_step(view: DrainView) -> DrainStep:
    if not view.running:
        return Leave()
    if view.elapsed_s >= view.timeout_s:
        return StopNow(view.running)
    return AwaitSeal(view.running)


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
            leader = agent.leader_present()
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
