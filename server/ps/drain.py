"""Graceful drain of a PS: its groups move to live PS servers before it exits.

On SIGTERM (``systemctl stop``) the PS

1. marks its registration ``draining`` (on its lease, as before): the
   controller places nothing new on it and, for every job with a copy of a
   group there, seals a generation whose placement has that copy on a live PS,
   moving the group whole over gRPC (server/controller/ps_drain.py); then it
   drops the job's shards here;
2. waits until it holds no shard, or ``--drain-timeout`` passes, and exits 0.

When no other PS is live, or no controller leads, nobody can take the groups:
it stops at once, as a lost PS (its jobs fail over or restore).

:func:`next_step` is the decision, a plain function of a :class:`DrainView`;
:func:`drain` applies it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from elasticd.coord.election import observe_leader
from elasticd.coord.etcd import EtcdClient, EtcdError
from elasticd.coord.keys import Keys
from elasticd.coord.session import Session

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0  # how long the controller gets to move the groups (--drain-timeout)
DRAIN_POLL_S = 0.2


@dataclass(frozen=True)
class DrainView:
    """What the draining PS sees now."""

    groups: int  # shards it still holds
    takers: int  # other registered PS that are not draining
    leader: bool  # a controller leads
    elapsed_s: float
    timeout_s: float


def next_step(view: DrainView) -> str:
    """What to do now: "leave" (nothing held), "stop_now" (nobody can take the groups,
    or the timeout passed) or "wait" (the controller is moving them)."""
    if view.groups == 0:
        return "leave"
    if not view.takers or not view.leader or view.elapsed_s >= view.timeout_s:
        return "stop_now"
    return "wait"


def _takers(client: EtcdClient, keys: Keys, ps_id: str) -> int:
    kvs, _ = client.get_prefix(keys.ps_servers)
    others = [json.loads(kv.value) for kv in kvs]
    return sum(1 for d in others if d.get("ps_id") != ps_id and not d.get("draining"))


def drain(
    ps_id: str,
    session: Session,
    client: EtcdClient,
    keys: Keys,
    registration: dict,
    held: Callable[[], int],
    timeout_s: float = DRAIN_TIMEOUT_S,
) -> str:
    """Drain this PS; returns how it ended ("leave" or "stop_now")."""
    began = time.monotonic()
    try:
        session.put(keys.ps(ps_id), json.dumps({**registration, "draining": True}).encode())
    except EtcdError as exc:
        log.warning("event=ps_drain_stopped ps=%s reason=etcd error=%s", ps_id, exc)
        return "stop_now"
    log.info("event=ps_drain_started ps=%s groups=%d timeout_s=%g", ps_id, held(), timeout_s)
    while True:
        try:
            takers = _takers(client, keys, ps_id)
            leader = observe_leader(client, keys.election) is not None
        except EtcdError as exc:
            log.warning("event=ps_drain_etcd_error ps=%s error=%s", ps_id, exc)
            takers, leader = 1, True  # unknown: wait for the controller until the timeout
        elapsed = time.monotonic() - began
        view = DrainView(held(), takers, leader, elapsed, timeout_s)
        step = next_step(view)
        if step == "leave":
            log.info("event=ps_drained ps=%s elapsed_s=%.1f", ps_id, elapsed)
            return step
        if step == "stop_now":
            log.warning(
                "event=ps_drain_stopped ps=%s groups=%d other_ps=%d leader=%s elapsed_s=%.1f "
                "reason=%s",
                ps_id,
                view.groups,
                takers,
                leader,
                elapsed,
                "timeout" if takers and leader else "nobody can take the groups",
            )
            return step
        time.sleep(DRAIN_POLL_S)
