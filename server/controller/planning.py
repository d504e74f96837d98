"""What the controller should do next for a job: a pure function of a snapshot.

The reconcile loop reads a :class:`JobSnapshot` and a :class:`ClusterSnapshot`
from its etcd caches, asks :func:`decide` for one action, and applies it.
Nothing here touches etcd, gRPC or storage.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from elasticd.jobspec import JobSpec
from elasticd.membership import Generation, NodeInfo, WorkerReport, choose_workers
from elasticd.placement import Copy, Move, ShardPlacement, TensorSpec, drain_moves, failover
from elasticd.server.controller.records import FAILED, TERMINAL, JobRecord

RESTARTING = "RESTARTING"  # as the agent reports a process waiting to come back
READY = "READY"  # a replacement that has started and waits to be let in (allreduce)


@dataclass(frozen=True)
class JobSnapshot:
    spec: JobSpec
    record: JobRecord
    generation: Generation | None
    workers: Mapping[str, WorkerReport] = field(default_factory=dict)
    placement: ShardPlacement | None = None
    # etcd mod revisions of the status and generation keys as read (0: absent):
    # every write about the job compares them, so a decision taken on a stale
    # snapshot never lands.
    revision: int = 0
    generation_revision: int = 0
    # the parameters as probed at submit (None: admitted before they were stored)
    tensors: tuple[TensorSpec, ...] | None = None


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: Mapping[str, NodeInfo]
    ps: Mapping[str, str]  # ps_id -> address
    # slots each other active job holds per node
    taken: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    ps_incarnations: Mapping[str, str] = field(default_factory=dict)  # ps_id -> boot id
    ps_draining: frozenset[str] = frozenset()  # PS that drain: nothing new is placed on them

    @property
    def ps_open(self) -> list[str]:
        """The registered PS that take new groups: every one but a draining one."""
        return sorted(p for p in self.ps if p not in self.ps_draining)

    def taken_except(self, job_id: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for other, per_node in self.taken.items():
            if other == job_id:
                continue
            for node, n in per_node.items():
                out[node] = out.get(node, 0) + n
        return out


@dataclass(frozen=True)
class Nothing:
    pass


@dataclass(frozen=True)
class Seal:
    """Seal the next generation with exactly these workers."""

    workers: tuple[str, ...]
    reason: str
    # The PS tier lost part of the job: place it again on the live tier and
    # restore it from the newest verified checkpoint, in this seal.
    restore: bool = False


@dataclass(frozen=True)
class Complete:
    pass


@dataclass(frozen=True)
class Fail:
    message: str


@dataclass(frozen=True)
class Wait:
    message: str


Action = Nothing | Seal | Complete | Fail | Wait


def decide(job: JobSnapshot, cluster: ClusterSnapshot) -> Action:
    rec, spec, gen = job.record, job.spec, job.generation
    if rec.state in TERMINAL:
        return Nothing()
    current = gen.worker_ids if gen else frozenset()
    reports = {w: r for w, r in job.workers.items() if gen and r.generation == gen.number}

    done = [w for w in current if reports.get(w) is not None and reports[w].state == "SUCCEEDED"]
    if gen and current and len(done) == len(current):
        return Complete()
    if done and rec.mode == "allreduce":
        # Replicas agree on the step: one finished means the job reached its
        # last step (the others may still wait in a group that cannot form).
        return Complete()
    for w in sorted(current):
        r = reports.get(w)
        if r is not None and r.state == FAILED:
            return Fail(
                f"worker {w} failed {r.restarts} times (last exit code {r.exit_code}); "
                f"max_restarts is {spec.max_restarts}: see its log with `elasticd logs`"
            )
    if rec.mode == "ps-async" and not cluster.ps:
        if current:
            return Seal((), "no parameter server is registered")
        return Wait("waiting for a parameter server to register")
    trouble = ps_trouble(job, cluster)
    # A restore that began (a PS may hold the checkpoint's state already) is finished
    # before anything else trains, even if the PS it replaced came back meanwhile.
    unfinished = rec.restore_pending > rec.restored_generation
    in_memory = bool(trouble) and not unfinished and planned_failover(job, cluster) is not None
    if trouble and not rec.checkpoint and not unfinished and not in_memory:
        # Never train on a PS tier that lost part of the model: stop, and wait.
        trouble += (
            "; no checkpoint to restore from (set checkpoint.every_steps or every_s): "
            "waiting for the parameter server to come back with its state"
        )
        return Seal((), trouble) if current else Wait(trouble)

    restarting = sorted(w for w, r in reports.items() if r.state == RESTARTING and w in current)
    if restarting and spec.mode == "script":
        # torchrun's rule: one failure restarts every process, in a new generation.
        return Seal(tuple(sorted(current)), f"restart after failure of {','.join(restarting)}")
    # allreduce: the group re-forms without the failed process first. Its
    # replacement keeps its place while it starts (no other slot takes it) and
    # joins a later generation once its agent reports it READY (invariant 9).
    starting = {w for w, r in job.workers.items() if r.state == RESTARTING}
    ready = {w for w, r in job.workers.items() if r.state == READY}
    failed = [w for w, r in job.workers.items() if r.state == FAILED] + sorted(starting)
    desired = choose_workers(
        schedulable(cluster.nodes),
        cluster.taken_except(spec_job_id(job)),
        current | ready,
        failed,
        max(spec.workers.max - len(starting), 0),
    )
    if len(desired) < spec.workers.min:
        if current:
            # Below the minimum (a worker left, or the minimum was raised past the
            # workers there are): end the running generation; the job waits.
            return Seal((), f"{len(desired)} of at least {spec.workers.min} workers available")
        return Wait(f"waiting for workers: {len(desired)} of at least {spec.workers.min} available")
    if in_memory:
        return Seal(tuple(desired), f"fail over to hot replicas: {trouble}", restore=True)
    if trouble or unfinished:
        why = trouble or "a restore that did not finish"
        return Seal(tuple(desired), f"restore from {rec.checkpoint}: {why}", restore=True)
    wanted = drain_wanted(job, cluster) or replica_wanted(job, cluster)
    if wanted and current:
        return Seal(tuple(desired), wanted, restore=True)
    # A member reported READY is a replacement whose predecessor died in this very
    # generation (it became ready before the departure was sealed): it waits for a
    # newer generation, so one is sealed although the set did not change.
    rejoined = sorted(ready & current & set(desired))
    if set(desired) != current or rejoined:
        lost = sorted(current - set(desired))
        joined = sorted(set(desired) - current)
        # A job submitted with --resume-from starts from that checkpoint.
        resume = rec.mode == "ps-async" and job.placement is None and bool(rec.resume_from)
        again = f" rejoined={','.join(rejoined)}" if rejoined else ""
        return Seal(
            tuple(desired),
            f"lost={','.join(lost) or '-'} joined={','.join(joined) or '-'}{again}",
            restore=resume,
        )
    return Nothing()


def schedulable(nodes: Mapping[str, NodeInfo]) -> dict[str, NodeInfo]:
    """The nodes a job may choose workers on: every registered node but a draining one.

    A draining node's workers are left out of the next generation, which is then
    a departure and sealed at once (see worker/agent/drain.py).
    """
    return {n: info for n, info in nodes.items() if not info.draining}


def ps_trouble(job: JobSnapshot, cluster: ClusterSnapshot) -> str:
    """Why the job's PS tier cannot serve its placement now ("" when it can).

    Only a ps-async job needs its PS tier. A placed PS that is not registered
    is gone (its lease expired) and may come back as it was; one registered
    under another boot id restarted, and holds none of the job's slices.
    """
    placement = job.placement
    if job.record.mode != "ps-async" or placement is None:
        return ""
    gone = [p for p in placement.ps_ids if p not in cluster.ps]
    restarted = [
        p
        for p in placement.ps_ids
        if p in cluster.ps
        and placement.incarnations.get(p)
        and cluster.ps_incarnations.get(p) != placement.incarnations[p]
    ]
    reasons = []
    if restarted:
        reasons.append(
            f"parameter server {', '.join(restarted)} restarted and lost this job's slices on it"
        )
    if gone:
        reasons.append(f"parameter server {', '.join(gone)} is gone (its lease expired)")
    return "; ".join(reasons)


def live_tier(cluster: ClusterSnapshot) -> dict[str, str]:
    """Registered PS servers and their boot ids."""
    return {p: cluster.ps_incarnations.get(p, "") for p in cluster.ps}


def planned_failover(
    job: JobSnapshot, cluster: ClusterSnapshot
) -> tuple[ShardPlacement, list[Copy]] | None:
    """The placement a failover from hot replicas gives now, or None: no replicas, or
    some group has no live copy (see server/controller/failover.py)."""
    if job.placement is None or job.spec.ps.replicas < 2:
        return None
    return failover(job.placement, live_tier(cluster), job.spec.ps.replicas)


def planned_drain(
    job: JobSnapshot, cluster: ClusterSnapshot
) -> tuple[ShardPlacement, list[Move]] | None:
    """The placement with no copy on a draining PS and the moves that make it, or None:
    nothing to move, or nowhere to move it (see server/controller/ps_drain.py)."""
    if job.record.mode != "ps-async" or job.placement is None or not cluster.ps_draining:
        return None
    if ps_trouble(job, cluster) or job.record.restore_pending > job.record.restored_generation:
        return None  # a loss is handled first, as a failover or a restore
    plan = drain_moves(job.placement, live_tier(cluster), cluster.ps_draining)
    return plan if plan is not None and plan[1] else None


def drain_wanted(job: JobSnapshot, cluster: ClusterSnapshot) -> str:
    """Why the job needs a seal that moves its groups off a draining PS ("" when it does not)."""
    plan = planned_drain(job, cluster)
    if plan is None:
        return ""
    moved = ",".join(f"{m.group}->{m.target}" for m in plan[1])
    return f"parameter server {','.join(sorted(cluster.ps_draining))} drains: groups {moved}"


def replica_wanted(job: JobSnapshot, cluster: ClusterSnapshot) -> str:
    """Why the job's replicas need a seal although no copy was lost ("" when they do not):
    a group runs without a backup while another PS could hold one."""
    if job.record.mode != "ps-async" or job.spec.ps.replicas < 2 or job.placement is None:
        return ""
    plan = planned_failover(job, cluster)
    if plan is None or not plan[1]:
        return ""
    groups = ",".join(c.group for c in plan[1])
    return f"groups {groups} get a backup on another parameter server"


def spec_job_id(job: JobSnapshot) -> str:
    return job.record.job_id


@dataclass(frozen=True)
class PendingChange:
    """A membership change waiting for its last call."""

    workers: tuple[str, ...]
    seen_at: float  # when this exact set was first wanted
    began_at: float  # when the membership first started to differ


def last_call(
    pending: PendingChange | None,
    workers: tuple[str, ...],
    now: float,
    window: float,
    max_wait: float,
) -> tuple[PendingChange, float]:
    """Gather a burst of joins (or losses) into one generation.

    A change is sealed once the wanted set has held still for ``window``
    seconds, or once changes have kept coming for ``max_wait`` seconds.
    Returns the updated pending change and how long to wait before sealing
    (0: seal now).
    """
    if pending is None:
        pending = PendingChange(workers, now, now)
    elif pending.workers != workers:
        pending = PendingChange(workers, now, pending.began_at)
    wait = min(pending.seen_at + window, pending.began_at + max_wait) - now
    return pending, max(wait, 0.0)


HEARD_S = 30.0  # a member whose progress came this recently counts as training


def running_members(
    gen: Generation | None, heard: Mapping[str, tuple[int, float]], now: float
) -> frozenset[str]:
    """Members of ``gen`` this controller heard training in it within HEARD_S.

    ``heard``: worker -> (generation, when) of its last progress report. The
    agents' reports in etcd are no evidence here: after a whole-cluster restart
    they outlive their (dead) agents until the old leases run out.
    """
    if gen is None:
        return frozenset()
    return frozenset(
        w
        for w, (g, at) in heard.items()
        if w in gen.worker_ids and g == gen.number and now - at <= HEARD_S
    )


def seal_at_once(
    action: Seal, current: frozenset[str], spec: JobSpec, running: frozenset[str] | None = None
) -> Seal | None:
    """The part of ``action`` to seal now, without the join window; None: wait for it.

    Nobody waits on a process that is starting (ARCHITECTURE invariant 9): a
    departure, a restart or a restore seals at once, since the running
    generation cannot step without it. Only joins wait for the window, to gather
    a burst of them into one generation, and not even they once the wanted set
    is full (``workers.max``: nobody else could join) or the running generation
    needs a restore anyway. A change that both loses
    and gains workers seals the survivors now and leaves the joins to the window,
    unless the survivors alone are below ``workers.min``.

    A generation none of whose members is heard training (``running``: the
    whole cluster was stopped and is coming back) has nobody to keep waiting: its
    change waits for the window, so that the nodes and servers coming back make
    one generation (and a restore is placed on the whole tier, not on the first
    server up). ``running`` None: every member runs.
    """
    if current and running is not None and not running & current:
        return None
    wanted = frozenset(action.workers)
    if wanted <= current or len(wanted) >= spec.workers.max or (action.restore and current):
        return action
    survivors = wanted & current
    if survivors == current or len(survivors) < spec.workers.min:
        return None  # a pure join, or one the survivors cannot train without
    return Seal(
        tuple(sorted(survivors)),
        f"{action.reason} (the departures now; the joins after the join window)",
        restore=action.restore,
    )


MASTER_PORT_BASE = 29400  # derived torchrun MASTER_PORTs fall in [base, base + span)
MASTER_PORT_SPAN = 500


def master_port(spec: JobSpec, job_id: str, generation: int) -> int:
    """The TCP port rank 0 of a script job listens on in this generation.

    A job may fix it (``script.master_port``); otherwise it is derived from the
    job and the generation, so concurrent jobs on one node rarely collide and a
    new generation never waits for the old one's socket to close.
    """
    if spec.script.master_port:
        return spec.script.master_port
    return MASTER_PORT_BASE + zlib.crc32(f"{job_id}:{generation}".encode()) % MASTER_PORT_SPAN
