"""Asynchronous parameter-server training: pull, compute a gradient, push.

The PS tier applies the optimizer; a worker holds only a replica of the
parameters, refreshed by every pull. The PS counts applied updates (its
version) and stops applying at ``steps``, so the job trains exactly that many
updates however many workers race for the last one.

A PS that cannot serve the worker is waited for, never crashed on: a fenced
worker (a newer generation exists) and one whose PS lost its shard (the PS
restarted) wait for the controller's next assignment; one whose PS does not
answer tries it again with backoff, since it may come back as it was.
Crashing instead would spend the job's ``max_restarts`` in seconds.

A push whose outcome the worker did not learn (its PS died, its backup did
not answer, the generation changed under a synchronous round) is sent again,
the same gradient under the same push id, once the PS tier can serve it: a
group that applied it already acknowledges it without applying it twice.
So a PS failover neither loses nor doubles an update, and the worker's data
stream goes on where it was.

Batch indices come from the controller in leased ranges
(worker/runtime/data_leases.py), and every push names its batch: a batch
applied already by a shard (its range was leased again after a worker died)
is refused there as a duplicate, so every batch is applied once.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass

import torch

from elasticd.jobspec import JobSpec, parse_spec
from elasticd.placement import ShardPlacement
from elasticd.ps_client import PSTier
from elasticd.ps_errors import DuplicatePush, Fenced, PSUnavailable, ShardLost, StaleGradient
from elasticd.retry import Backoff
from elasticd.task import load_task
from elasticd.worker.runtime import heartbeat
from elasticd.worker.runtime.control import Assignment, ControlChannel
from elasticd.worker.runtime.data_leases import LeasedBatches
from elasticd.worker.runtime.handover import Handover
from elasticd.worker.runtime.progress import ProgressReporter
from elasticd.worker.runtime.switching import Switch, from_ps, into_ps

log = logging.getLogger(__name__)

PS_WAIT_S = 300.0  # how long a worker waits for a lost PS or a new assignment, then exits
PS_RETRY_S = (0.05, 1.0)  # backoff between tries of a PS that did not answer: first, longest

WAIT_LOG_EVERY_S = 5.0  # a wait that goes on is logged again this often
_last_wait: list = [None, 0.0]  # (reason, generation) and when the last wait was logged

# A PS tier that cannot serve this worker now: the worker waits on these.
_WAIT_FOR = (Fenced, ShardLost, PSUnavailable)


@dataclass
class PendingPush:
    """A push whose outcome is unknown, kept to be sent again unchanged."""

    grads: dict[str, torch.Tensor]
    versions: dict[str, int]
    push_id: int
    loss: float
    batch: int
    stale_tries: int = 0  # times it was answered "not applied, pull again"


class NewAssignment(Exception):
    """A new assignment arrived while the worker waited for its PS tier."""

    def __init__(self, assignment: Assignment) -> None:
        super().__init__(assignment.generation)
        self.assignment = assignment


def _wait(control: ControlChannel, exc: Exception, a: Assignment) -> Assignment | None:
    """After ``exc``, wait for a new assignment; None means "try the same PS again".

    Raises TimeoutError after PS_WAIT_S without one, or when the agent is gone.
    """
    retry = isinstance(exc, PSUnavailable)
    now = time.monotonic()
    if (type(exc), a.generation) != _last_wait[0] or now - _last_wait[1] >= WAIT_LOG_EVERY_S:
        _last_wait[:] = [(type(exc), a.generation), now]  # one line per streak, not per try
        log.warning(
            "event=ps_wait job=%s generation=%d worker=%s reason=%s detail=%s",
            a.job_id,
            a.generation,
            a.worker_id,
            type(exc).__name__,
            exc,
        )
    deadline = time.monotonic() + PS_WAIT_S
    next_try = time.monotonic() + Backoff(*PS_RETRY_S).next_delay()
    while not control.closed.is_set():
        heartbeat.beat()
        new = control.poll()
        if new is not None:
            return new
        now = time.monotonic()
        if retry and now >= next_try:
            return None
        if now > deadline:
            raise TimeoutError(f"no new assignment in {PS_WAIT_S:g}s after: {exc}")
        time.sleep(0.05)
    raise TimeoutError("the agent closed the control pipe")


def _connect(
    a: Assignment, spec: JobSpec, data: dict[str, torch.Tensor], control: ControlChannel
) -> PSTier:
    """A client of ``a``'s PS tier, with the job's shards in place.

    A missing shard is created from this worker's model only on the PS
    incarnation the controller placed it on; otherwise the worker waits.
    Raises :class:`NewAssignment` when a new generation arrives meanwhile.
    """
    backoff = Backoff(*PS_RETRY_S)
    while True:
        placement = ShardPlacement.from_json(json.dumps(a.placement))
        tier = None
        try:
            # Raises PSUnavailable when a placed PS had no address (it was not registered).
            tier = PSTier(
                a.job_id, a.generation, placement, a.ps, worker_id=a.worker_id, workers=a.world_size
            )
            created = tier.init(
                data,
                spec.optimizer.name,
                spec.optimizer.kwargs,
                spec.ps.max_staleness,
                workers=a.world_size,
                max_version=spec.steps,
            )
        except _WAIT_FOR as exc:
            if tier is not None:
                tier.close()
            new = _wait(control, exc, a)
            if new is not None:
                raise NewAssignment(new) from None
            time.sleep(backoff.next_delay())
            continue
        log.info(
            "event=shards_ready job=%s generation=%d worker=%s created=%s",
            a.job_id,
            a.generation,
            a.worker_id,
            created,
        )
        return tier


def _switch_out(tier: PSTier, placement: ShardPlacement, new: Assignment) -> Switch:
    """A switch: every worker takes the PS tier's state along, in the new generation."""
    tier.generation = new.generation
    state = from_ps(tier, placement)
    log.info(
        "event=switched_out job=%s generation=%d worker=%s step=%d digest=%s",
        new.job_id,
        new.generation,
        new.worker_id,
        state.step,
        state.digest(),
    )
    return Switch(new, state)


class PSConnection:
    """The worker's PS tier for its current assignment; rebuilt when the tier changes."""

    def __init__(
        self, a: Assignment, spec: JobSpec, data: dict[str, torch.Tensor], control: ControlChannel
    ) -> None:
        self.spec, self.data, self.control = spec, data, control
        self.a = a
        self.tier: PSTier | None = None
        self._reconnect()

    def _reconnect(self) -> None:
        """Connect to ``self.a``'s PS tier, following new ps-async assignments meanwhile."""
        while self.tier is None:
            try:
                self.tier = _connect(self.a, self.spec, self.data, self.control)
            except NewAssignment as na:
                if na.assignment.spec["mode"] != "ps-async":
                    raise
                self.a = na.assignment

    @property
    def placement(self) -> ShardPlacement:
        return self.tier.placement

    def adopt(self, new: Assignment) -> None:
        """Move to ``new``'s generation; reconnect if its PS tier or placement changed."""
        log.info(
            "event=generation_adopted job=%s generation=%d rank=%d world=%d",
            new.job_id,
            new.generation,
            new.rank,
            new.world_size,
        )
        old, self.a = self.a, new
        if new.placement == old.placement and new.ps == old.ps:
            self.tier.generation, self.tier.workers = new.generation, new.world_size
            return
        self.tier.close()
        self.tier = None
        self._reconnect()

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()


def train(
    first: Assignment, control: ControlChannel, handover: Handover | None = None
) -> int | Switch:
    spec: JobSpec = parse_spec(first.spec)
    task = load_task(spec.task, spec.batch_size, spec.seed, spec.task_args)
    model = task.build_model()
    params = dict(model.named_parameters())
    data = {n: p.detach() for n, p in params.items()}
    try:
        ps = PSConnection(first, spec, data, control)
    except NewAssignment as na:  # switched away before this worker ever trained
        return Switch(na.assignment, handover) if handover is not None else 3
    except TimeoutError as exc:
        log.error(
            "event=ps_wait_gave_up job=%s worker=%s detail=%s", first.job_id, first.worker_id, exc
        )
        return 3
    a = ps.a
    reporter = ProgressReporter(a.controller, a.job_id, a.worker_id, a.rank)
    if handover is not None:
        # Switched from allreduce: the replica becomes the shards' state.
        sent, held = into_ps(ps.tier, a, spec, handover)
        if a.rank == 0:
            log.info(
                "event=switched_in job=%s generation=%d worker=%s step=%d digest=%s sent=%s",
                a.job_id,
                a.generation,
                a.worker_id,
                handover.step,
                held,
                sent,
            )

    synchronous = spec.ps.max_staleness == 0
    losses: deque[float] = deque(maxlen=spec.report_every_steps)
    batches = LeasedBatches(
        lambda: reporter.stub,
        a.job_id,
        a.worker_id,
        start_hint=handover.position if handover else 0,
    )
    local_steps = 0
    step = 0
    push_ids = itertools.count(secrets.randbits(48) + 1)  # unique across restarts of the slot
    pending: PendingPush | None = None
    try:
        while True:
            heartbeat.beat()
            new = control.poll()
            try:
                if new is not None:
                    if new.spec["mode"] != "ps-async":
                        return _switch_out(ps.tier, ps.placement, new)
                    if new.resume_generation > a.generation:  # restored since: rewind the data
                        batches.reset()  # the controller rebuilt the queue from the checkpoint
                        pending = None  # its versions are gone with the state it was computed on
                    ps.adopt(new)
                    a = ps.a
                    reporter.retarget(a.controller)
                if pending is None:
                    versions = ps.tier.pull_into(data)
                    step = min(versions.values())
                    if step >= spec.steps:
                        break
                    index = batches.next(a.generation)
                    if index is None:
                        continue  # nothing to train on yet: poll the assignment, ask again
                    batch = task.batch(index)
                    model.zero_grad(set_to_none=False)
                    loss = task.loss(model, batch)
                    loss.backward()
                    grads = {
                        n: p.grad if p.grad is not None else torch.zeros_like(p)
                        for n, p in params.items()
                    }
                    pending = PendingPush(grads, versions, next(push_ids), loss.item(), index)
                else:
                    log.info(
                        "event=push_again job=%s generation=%d worker=%s push_id=%d",
                        a.job_id,
                        a.generation,
                        a.worker_id,
                        pending.push_id,
                    )
                outcomes = ps.tier.push(
                    pending.grads,
                    pending.versions,
                    spec.ps.compression,
                    push_id=pending.push_id,
                    batch=pending.batch,
                )
                batches.done(pending.batch)
                loss_value, pending = pending.loss, None
            except DuplicatePush:
                time.sleep(0.05)  # its first copy still waits in the round: ask again shortly
                continue
            except StaleGradient as exc:
                log.info("event=push_stale job=%s worker=%s detail=%s", a.job_id, a.worker_id, exc)
                # A synchronous round aborted by a generation change is joined again with the
                # same push; a push refused as too old (or refused twice) is given up.
                if pending is not None and (not synchronous or pending.stale_tries > 0):
                    pending = None
                elif pending is not None:
                    pending.stale_tries += 1
                continue
            except NewAssignment as na:  # a switch arrived while reconnecting
                new = na.assignment
                placement = ShardPlacement.from_json(json.dumps(new.placement))
                ps.tier = PSTier(new.job_id, new.generation, placement, new.ps, new.worker_id)
                return _switch_out(ps.tier, placement, new)
            except _WAIT_FOR as exc:
                new = _wait(control, exc, a)
                if new is not None:
                    control.push_back(new)  # adopted at the top of the loop
                continue
            step = min(o.version for o in outcomes.values())
            if all(o.duplicate for o in outcomes.values()):
                continue  # applied before, by this range's earlier holder
            local_steps += 1
            losses.append(loss_value)
            if local_steps == 1 or local_steps % spec.report_every_steps == 0:
                mean = sum(losses) / len(losses)
                log.info(
                    "event=step job=%s generation=%d worker=%s step=%d loss=%.4f",
                    a.job_id,
                    a.generation,
                    a.worker_id,
                    step,
                    mean,
                )
                if reporter.report(a.generation, step, mean).stop:
                    break
            if step >= spec.steps or not all(o.applied or o.duplicate for o in outcomes.values()):
                break
        mean = sum(losses) / len(losses) if losses else math.nan
        reporter.report(a.generation, max(step, 0), mean, finished=True)
        log.info(
            "event=worker_done job=%s worker=%s step=%d local_steps=%d loss=%.4f",
            a.job_id,
            a.worker_id,
            step,
            local_steps,
            mean,
        )
        return 0
    except TimeoutError as exc:
        log.error("event=ps_wait_gave_up job=%s worker=%s detail=%s", a.job_id, a.worker_id, exc)
        return 3
    finally:
        ps.close()
        reporter.close()
