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
:func:`elasticd.worker.agent.node_drain.drain` applies it to a
:class:`~elasticd.worker.agent.agent.NodeAgent`. This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


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
