"""Synchronous all-reduce training: full replicas, averaged gradients, elastic groups.

Every worker holds a full replica (:mod:`.replica`). One step of the job:

1. at the step boundary, take the newest assignment from the agent;
2. rank ``r`` of ``W`` trains on batch ``position + r`` (``position`` starts
   at 0 and grows by ``W`` per step, so each step consumes ``W`` distinct
   batches and none is used twice when ``W`` changes; with a constant world
   size, batch index = ``step * W + r``);
3. forward, then an asynchronous all-reduce of a small control vector
   (“I hold a newer generation”, “the controller says stop”, my loss),
   then backward with gradients all-reduced bucket by bucket as they appear
   (:mod:`.grad_buckets`), summed and divided by ``W``;
4. ``optimizer.step()`` at the elastic learning rate.

The control vector makes every decision that ends a group a collective one:
when any rank holds a newer generation, all ranks finish the step, then all
form the new group; nobody breaks a collective to find out. A collective that
fails anyway (a peer died or hung past ``collective_timeout_s``) is caught,
the group is destroyed and formed again (:mod:`.process_group`) — for a
newer generation if the agent hands one over, else as a new round of the
same generation (a restarted peer) — and state comes from the surviving
replica with the highest step. The step in flight is simply redone. SIGTERM
(a draining agent) is a request to leave at the next step boundary (:mod:`.departure`).

Every worker reports progress (global step, mean loss over ranks) every
``report_every_steps`` steps, and exits 0 once the global step reaches
``steps``. Every ``checkpoint.every_steps`` steps, at the last one, and
when the answer to a report asks for one (``checkpoint.every_s``,
``elasticd checkpoint``, a cancel: agreed in the next step's control vector),
each rank writes its slice of the replica (:mod:`.checkpointing`); a group
formed without any state starts from the job's newest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from elasticd.jobspec import JobSpec, parse_spec
from elasticd.task import load_task
from elasticd.worker.runtime import heartbeat
from elasticd.worker.runtime.allreduce_config import AllreduceConfig
from elasticd.worker.runtime.checkpointing import RankCheckpointer, restore_state
from elasticd.worker.runtime.control import (
    Assignment,
    AssignmentFeed,
    ControlChannel,
    announce_ready,
)
from elasticd.worker.runtime.departure import Departure, depart_now
from elasticd.worker.runtime.grad_buckets import FIRST_BUCKET_CAP_BYTES, GradientBuckets
from elasticd.worker.runtime.handover import Handover
from elasticd.worker.runtime.process_group import (
    CollectiveFailed,
    ElasticGroup,
    GroupAbandoned,
    LeftOut,
    pick_backend,
)
from elasticd.worker.runtime.progress import ProgressReporter
from elasticd.worker.runtime.rendezvous import ControllerDirectory, RendezvousDirectory
from elasticd.worker.runtime.replica import LRSchedule, Replica
from elasticd.worker.runtime.switching import (
    Switch,
    await_switch,
    from_model,
    into_model,
    switch_scheduled,
)

log = logging.getLogger(__name__)

Observer = Callable[[str, dict[str, Any]], None]

CHECKPOINT_WAIT_S = 300.0  # how long a finished worker waits for its last checkpoint slice


def train(
    first: Assignment, control: ControlChannel, handover: Handover | None = None
) -> int | Switch:
    """The ``allreduce`` training mode, as started by an agent (or after a switch)."""
    directory = ControllerDirectory()
    reporter = ProgressReporter(first.controller, first.job_id, first.worker_id, first.rank)
    try:
        worker = AllreduceWorker(first, control, directory, reporter)
        worker.departure.install()  # SIGTERM: leave at the next step boundary
        if handover is not None:
            worker.adopt(handover)
        announce_ready()
        # A replacement joins only the generation sealed with it, once it is ready.
        return worker.run(after=first.generation if control.standby else 0)
    finally:
        reporter.close()
        directory.close()


class AllreduceWorker:
    def __init__(
        self,
        first: Assignment,
        control: ControlChannel | None,
        directory: RendezvousDirectory,
        reporter: ProgressReporter | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.config = AllreduceConfig.from_spec(first.spec)
        self.spec: JobSpec = parse_spec(first.spec)
        self.feed = AssignmentFeed(first, control)
        self.reporter = reporter
        self.observer = observer
        backend, self.device = pick_backend(first.local_rank)
        task = load_task(self.spec.task, self.spec.batch_size, self.spec.seed, self.spec.task_args)
        schedule = LRSchedule(
            Replica.base_lr(self.spec),
            self.spec.workers.max,
            self.config.scale_lr,
            self.config.warmup_steps,
        )
        self.replica = Replica(task, self.spec, self.device, schedule)
        cap = max(int(self.config.bucket_cap_mb * 2**20), 1)
        self.buckets = GradientBuckets(
            self.replica.params, cap_bytes=cap, first_cap_bytes=min(cap, FIRST_BUCKET_CAP_BYTES)
        )
        self.group = ElasticGroup(directory, backend, self.config.collective_timeout_s)
        self.checkpointer = RankCheckpointer(
            first.job_id,
            first.checkpoint_url,
            self.spec.checkpoint.every_steps,
            self.spec.steps,
            self.spec.optimizer.name,
            reporter,
        )
        self._stop = False
        self.departure = Departure()  # the agent stops this process (a drain)
        self._checkpoint_asked = False  # the controller asked for a checkpoint
        self._peers: tuple[str, ...] = ()  # the other members of the formed generation
        self._losses: deque[float] = deque(maxlen=self.spec.report_every_steps)
        self._trained = 0  # steps this process took part in

    def adopt(self, handover: Handover) -> None:
        """Start from state handed over by a switch (identical on every rank)."""
        r = self.replica
        into_model(handover, r.model, r.optimizer)
        r.step, r.position, r.has_state = handover.step, handover.position, True
        a = self.feed.current
        landed = from_model(r.model, r.optimizer, r.step, r.position)
        log.info(
            "event=switched_in job=%s generation=%d worker=%s step=%d digest=%s",
            a.job_id,
            a.generation,
            a.worker_id,
            r.step,
            landed.digest(),
        )

    # -- the outer loop: form, agree, train ---------------------------------------

    def run(self, after: int = 0) -> int | Switch:
        """Train until the job is done or switches mode; ``after``: form only a generation
        newer than this one (a replacement waits, however long, to be let in)."""
        try:
            if after:
                self.feed.admitted(after)
            while True:
                try:
                    self.group.form(self.feed, after_generation=after)
                    self._formed()
                    with self.departure.deferred():
                        outcome = self._train()
                except CollectiveFailed as exc:
                    if self.departure.asked:
                        self._depart()
                    a = self.feed.current
                    log.warning(
                        "event=collective_failed job=%s generation=%d worker=%s step=%d error=%s",
                        a.job_id,
                        self.group.generation,
                        a.worker_id,
                        self.replica.step,
                        exc,
                    )
                    self._observe("failed", error=str(exc))
                    self._report_peers()
                    self.group.destroy()
                    after = 0
                    continue
                except LeftOut as exc:  # the job fell below workers.min
                    self.feed.outside(exc.generation, self.replica.step)
                    after = exc.generation
                    continue
                if outcome == "reform" and self.departure.asked:
                    self._depart()
                if outcome == "reform":
                    after = self.group.generation
                    self.group.destroy()
                    newest = self.feed.newer_than(after)
                    if newest.spec["mode"] != "allreduce":
                        # Every rank stopped after the same step: hand the replica over.
                        r = self.replica
                        state = from_model(r.model, r.optimizer, r.step, r.position)
                        log.info(
                            "event=switched_out job=%s generation=%d worker=%s step=%d digest=%s",
                            newest.job_id,
                            newest.generation,
                            newest.worker_id,
                            r.step,
                            state.digest(),
                        )
                        return Switch(newest, state)
                    continue
                self._finish()
                return 0
        except GroupAbandoned as exc:
            a = self.feed.current
            log.error(
                "event=group_abandoned job=%s generation=%d worker=%s error=%s",
                a.job_id,
                a.generation,
                a.worker_id,
                exc,
            )
            return 3
        finally:
            self.group.close()

    def _depart(self) -> NoReturn:
        a, generation = self.feed.current, self.group.generation
        log.info("event=departed job=%s generation=%d worker=%s", a.job_id, generation, a.worker_id)
        depart_now()

    def _report_peers(self) -> None:
        """A broken collective lost some peer: name them all to the controller, which asks
        their agents (a dead node is then left out before its lease expires). In the
        background: re-forming never waits for it."""
        generation, peers = self.group.generation, self._peers
        if self.reporter is None or not peers:
            return
        threading.Thread(
            target=self.reporter.peer_lost, args=(generation, peers), daemon=True
        ).start()

    def _formed(self) -> None:
        a = self.feed.current
        self._peers = a.peers if a.generation == self.group.generation else ()
        if self.reporter is not None:
            self.reporter.retarget(a.controller)
            self.reporter.rank = a.rank
        if a.local_rank != self.device.index and self.device.type == "cuda":
            log.warning(
                "event=local_rank_changed job=%s worker=%s local_rank=%d device=%s",
                a.job_id,
                a.worker_id,
                a.local_rank,
                self.device,
            )
        had = self.replica.step, self.replica.has_state
        source = self.replica.sync(self.group, restore=self._restore)
        log.info(
            "event=state_synced job=%s generation=%d worker=%s rank=%d world=%d source=%d "
            "step=%d position=%d had_step=%d had_state=%s lr=%.6g",
            a.job_id,
            self.group.generation,
            a.worker_id,
            self.group.rank,
            self.group.world_size,
            source,
            self.replica.step,
            self.replica.position,
            had[0],
            had[1],
            self.replica.lr(self.group.world_size),
        )
        self._observe("formed", source=source)

    # -- the inner loop: steps of one group ---------------------------------------

    def _train(self) -> str:
        """Steps until the job is done ("done"), told to stop ("stop"), or must re-form."""
        waited_at = -1
        while self.replica.step < self.spec.steps:
            heartbeat.beat()
            if switch_scheduled(self.spec, self.replica.step) and waited_at != self.replica.step:
                waited_at = self.replica.step
                self._report()  # the controller switches on a report of this step
                if await_switch(self.feed, self.group.generation, self.replica.step):
                    return "reform"
            if self.feed.refresh():
                a = self.feed.current
                if self.reporter is not None:
                    self.reporter.retarget(a.controller)
                self.group.publish(a)  # rank 0: a new leader needs our store's address
            reform, stop, asked, loss = self.step()
            if asked:
                self._checkpoint_asked = False  # every rank takes this one
            if asked or self.checkpointer.due(self.replica.step):
                r, g = self.replica, self.group
                self.checkpointer.take(
                    r.model, r.optimizer, r.step, r.position, g.rank, g.world_size, g.generation
                )
            self._losses.append(loss)
            self._trained += 1
            self._observe("step", loss=loss)
            if self.replica.step % self.spec.report_every_steps == 0 or self._trained == 1:
                self._report()
            if stop:
                return "stop"
            if reform:
                # Even after the last step: the new generation's fresh processes
                # then learn from the sync that the job is done, and exit with us.
                return "reform"
        return "done"

    def step(self) -> tuple[bool, bool, bool, float]:
        """One synchronous step; returns (re-form, stop, checkpoint, mean loss over ranks):
        what any rank asked for holds for all of them."""
        g, replica = self.group, self.replica
        world = g.world_size
        batch = self.replica.task.batch(replica.position + g.rank)
        if self.device.type != "cpu":
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
        self.buckets.prepare(g)
        loss = replica.task.loss(replica.model, batch)
        control = torch.zeros(4, dtype=torch.float64, device=self.device)
        control[0] = float(self.feed.current.generation > g.generation or self.departure.asked)
        control[1] = float(self._stop)
        control[2] = float(self._checkpoint_asked)
        control[3] = loss.detach().to(torch.float64)
        work = g.all_reduce(control, async_op=True)
        try:
            loss.backward()
            self.buckets.finish()
        except BaseException:
            with contextlib.suppress(CollectiveFailed):
                g.wait(work)  # never leave a collective in flight behind us
            raise
        g.wait(work)
        replica.set_lr(replica.lr(world))
        replica.optimizer.step()
        replica.step += 1
        replica.position += world
        reform, stop, asked, total = control.tolist()
        return reform > 0, stop > 0, asked > 0, total / world

    # -- reporting ------------------------------------------------------------------

    def _mean_loss(self) -> float:
        return sum(self._losses) / len(self._losses) if self._losses else math.nan

    def _report(self, finished: bool = False) -> None:
        a = self.feed.current
        mean = self._mean_loss()
        log.info(
            "event=step job=%s generation=%d worker=%s step=%d loss=%.4f world=%d",
            a.job_id,
            self.group.generation,
            a.worker_id,
            self.replica.step,
            mean,
            self.group.world_size,
        )
        if self.reporter is None:
            return
        ack = self.reporter.report(self.group.generation, self.replica.step, mean, finished)
        # Both agreed with the other ranks in the next step's control vector.
        self._stop = self._stop or ack.stop
        self._checkpoint_asked = self._checkpoint_asked or ack.checkpoint

    def _restore(self) -> Handover | None:
        """State for a group that has none: the job's newest verified checkpoint, if any."""
        a = self.feed.current
        return restore_state(a.job_id, a.checkpoint_url, a.resume_from)

    def _finish(self) -> None:
        self.checkpointer.wait(CHECKPOINT_WAIT_S)  # the last step's checkpoint, before exiting
        self._report(finished=True)
        a = self.feed.current
        log.info(
            "event=worker_done job=%s worker=%s step=%d local_steps=%d loss=%.4f",
            a.job_id,
            a.worker_id,
            self.replica.step,
            self._trained,
            self._mean_loss(),
        )

    def _observe(self, event: str, **fields_: Any) -> None:
        if self.observer is None:
            return
        self.observer(
            event,
            {
                "generation": self.group.generation,
                "round": self.group.round,
                "rank": self.group.rank,
                "world_size": self.group.world_size,
                "step": self.replica.step,
                "position": self.replica.position,
                "lr": self.replica.lr(max(self.group.world_size, 1)),
                "replica": self.replica,
                **fields_,
            },
        )
