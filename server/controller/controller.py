"""The controller: admits jobs, seals membership generations, orders checkpoints.

State lives in etcd; this object holds caches of it and the training progress
that workers report over gRPC (kept in memory: progress is per step, and etcd
carries control, never per-step data). Only the leader acts; a standby keeps
its caches warm and takes over with nothing to reload but what etcd holds.

Everything about one job runs on that job's lane (:mod:`.executor`), one
piece at a time: reconcile passes, cancels, switches, checkpoints and the
end. Every write is conditional on the job as it was read and on this
controller's leadership (:mod:`.writes`). The decisions themselves are plain
functions: :func:`.planning.decide`, :func:`.modes.plan_switch`,
:func:`.sealing.next_generation`, :func:`.checkpoints.checkpoint_due`; the
effects beside them take the controller: :func:`.sealing.seal`,
:func:`.admission.admit`, :func:`.scaling.scale`, :func:`.restore.restore_in_seal`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from elasticd.coord.election import Election, NotLeading
from elasticd.coord.etcd import Compare, EtcdClient, Put
from elasticd.coord.keys import Keys
from elasticd.coord.session import DEFAULT_TTL_S
from elasticd.jobspec import JobSpec
from elasticd.membership import Generation
from elasticd.security import config as security
from elasticd.security.job_credentials import JobMinter
from elasticd.security.storage import StoragePolicy
from elasticd.server.controller import admission, checkpoints, reports, scaling, sealing
from elasticd.server.controller.admission import CONFLICT_RETRIES
from elasticd.server.controller.adoption import adoption_ops
from elasticd.server.controller.data_service import DataQueues
from elasticd.server.controller.errors import BUG_GIVE_UP_S, Conflict, is_retryable, is_terminal
from elasticd.server.controller.executor import JobLanes, OffLane
from elasticd.server.controller.finishing import finish_ops, release_shards
from elasticd.server.controller.job_figures import JobFigures
from elasticd.server.controller.job_scalars import JobScalars
from elasticd.server.controller.join_window import JOIN_WINDOW_S, JoinWindow
from elasticd.server.controller.modes import SwitchRefused, plan_switch
from elasticd.server.controller.planning import (
    ClusterSnapshot,
    Complete,
    Fail,
    JobSnapshot,
    Seal,
    Wait,
    decide,
    running_members,
)
from elasticd.server.controller.progress import Progress, ProgressBook
from elasticd.server.controller.rank_checkpoints import RankCheckpoints
from elasticd.server.controller.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    TERMINAL,
    WAITING,
    JobRecord,
)
from elasticd.server.controller.restore import RestoreBackoff
from elasticd.server.controller.shapes import JobShapes
from elasticd.server.controller.suspicion import PeerSuspicions
from elasticd.server.controller.view import EtcdView, JobNotFound
from elasticd.server.controller.writes import JobWriter
from elasticd.shape_probe.client import ShapeProbe

__all__ = ["Controller", "NotLeader", "SwitchRefused"]

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 0.5  # reconcile at least this often, and on every change

NotLeader = NotLeading


class Controller:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        address: str,
        checkpoint_url: str,
        join_window_s: float = JOIN_WINDOW_S,
        election: Election | None = None,
        lease_ttl_s: float = DEFAULT_TTL_S,
        startup_grace_s: float | None = None,
        probe: ShapeProbe | None = None,
        storage: StoragePolicy | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.address = address
        self.checkpoint_url = checkpoint_url
        self.mint = JobMinter.of(security.current())  # each worker's job credential
        self.storage = storage or StoragePolicy.open()  # where jobs may name storage
        self.election = election
        self._wake = threading.Event()
        self.progress = ProgressBook()
        self.figures = JobFigures()  # recoveries and checkpoints, for the metrics
        self.scalars = JobScalars()  # TensorBoard scalars of the jobs that ask for them
        self.view = EtcdView(client, keys, self._changed)
        self.data = DataQueues()  # ps-async data leases, while leading
        self.lanes = JobLanes()
        self.writer = JobWriter(
            client, keys, self._guard, self._still_leading, self.view.wait_for_revision
        )
        self.shapes = JobShapes(probe or ShapeProbe(), self.writer, keys)  # no task runs here
        self.joins = JoinWindow(join_window_s)  # departures seal at once, joins wait for it
        self.suspicions = PeerSuspicions(hold_s=2 * lease_ttl_s)  # nodes a survivor lost
        self.startup_grace_s = (
            max(2 * lease_ttl_s, 10.0) if startup_grace_s is None else startup_grace_s
        )  # how long a new leader's restores wait for the PS that held a job
        self.leading_since = 0.0
        self._is_leader = False
        self.adopted: set[str] = set()  # jobs whose generation this leader sealed or adopted
        self.background = OffLane()  # one checkpoint or completion under way per job
        self.rank_checkpoints = RankCheckpoints()  # allreduce checkpoints: asked for, reported
        self.restores = RestoreBackoff()
        self._failing_since: dict[str, float] = {}  # job -> first of its unexpected errors
        self.reconciles = 0  # reconcile passes run (read by tests and the metrics)

    def start(self) -> Controller:
        self.view.start()
        return self

    def stop(self) -> None:
        self.lanes.shutdown()
        self.view.stop()
        self.shapes.probe.close()

    def job_ids(self) -> list[str]:
        return self.view.job_ids()

    def snapshot(self, job_id: str) -> JobSnapshot:
        return self.view.snapshot(job_id)

    def status(self, job_id: str) -> tuple[JobRecord, Generation | None, dict[str, Progress]]:
        snap = self.snapshot(job_id)
        return self.progress.live(snap.record), snap.generation, self.progress.of(job_id)

    def owner_of(self, job_id: str) -> str | None:
        """Who submitted ``job_id`` ("" before owners were recorded); None: no such job."""
        try:
            return self.snapshot(job_id).record.owner
        except KeyError:  # JobNotFound
            return None

    # -- leadership -------------------------------------------------------------

    def _guard(self) -> list[Compare]:
        if not self._is_leader or self.election is None:
            raise NotLeading("this controller is a standby; ask the leader")
        return self.election.guard()

    def _still_leading(self) -> bool:
        leading = self.election is not None and self.election.is_leader()
        if not leading:
            self.set_leader(False)
        return leading

    def require_leader(self) -> None:
        if not self._is_leader:
            raise NotLeader("this controller is a standby; ask the leader")

    def set_leader(self, leader: bool) -> None:
        if leader and not self._is_leader:
            log.info("event=leadership_acquired address=%s", self.address)
            self.shapes.probe.start()  # only the leader admits jobs
            self.leading_since = time.monotonic()
            self.adopted.clear()
            self.data.forget()  # leases handed out meanwhile by another leader
        if not leader and self._is_leader:
            log.warning("event=leadership_lost address=%s", self.address)
        self._is_leader = leader

    @property
    def is_leader(self) -> bool:
        return self._is_leader

    # -- user requests ------------------------------------------------------------

    def submit(
        self, spec: JobSpec, resume_from: str = "", owner: str = "", admin: bool = False
    ) -> str:
        """Admit a job for ``owner``; ``resume_from`` names a checkpoint it starts from
        (NoSuchCheckpoint), of a job ``owner`` owns unless ``admin`` (NotYours). Storage
        outside ``self.storage`` is refused (StorageRefused)."""
        self.require_leader()
        job_id = admission.admit(self, spec, resume_from, owner, admin)
        self._wake.set()
        return job_id

    def scale(self, job_id: str, wmin: int, wmax: int) -> JobRecord:
        """New worker bounds for a job that has not ended (NotScalable, BadBounds)."""
        self.require_leader()
        return self._on_lane(job_id, lambda: scaling.scale(self, job_id, wmin, wmax))

    def cancel(self, job_id: str) -> JobRecord:
        self.require_leader()
        checkpoints.final_checkpoint(self, job_id)
        return self._on_lane(job_id, lambda: self._cancel(job_id))

    def checkpoint(self, job_id: str) -> JobRecord:
        """Checkpoint a running job now (NotCheckpointable if it cannot be)."""
        self.require_leader()
        checkpoints.checkpoint_now(self, job_id)
        return self.snapshot(job_id).record

    def switch(self, job_id: str, mode: str, reason: str = "") -> JobRecord:
        """Move a running job to ``mode`` at its next step boundary."""
        self.require_leader()
        return self._on_lane(job_id, lambda: self._switch(job_id, mode, reason, False))

    def _on_lane(self, job_id: str, fn: Callable[[], JobRecord]) -> JobRecord:
        """Run a user request on the job's lane, again on a conflict (the job moved on)."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return self.lanes.run(job_id, fn)
            except Conflict:
                if attempt == CONFLICT_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _cancel(self, job_id: str) -> JobRecord:
        return self._end(job_id, CANCELLED, "cancelled by user")

    def _switch(
        self, job_id: str, mode: str, reason: str, scheduled: bool, entry: int = -1
    ) -> JobRecord:
        snap = self.snapshot(job_id)
        if scheduled and snap.record.switches_done != entry:
            return snap.record  # that scheduled switch is done: a late duplicate of its request
        cluster = self.view.cluster()
        record, seal = plan_switch(snap, cluster, mode, reason, scheduled)
        if seal is None:
            if record != snap.record:
                self.writer.update(snap, [self.record_put(record)])
            return self.snapshot(job_id).record
        sealing.seal(self, replace(snap, record=record), cluster, seal)
        log.info("event=mode_switch job=%s from=%s to=%s", job_id, snap.record.mode, mode)
        return self.snapshot(job_id).record

    def report(
        self, job_id: str, worker: str, generation: int, step: int, loss: float, finished: bool
    ) -> tuple[bool, bool]:
        """Record a worker's progress (:func:`.reports.record_report`)."""
        return reports.record_report(self, job_id, worker, generation, step, loss, finished)

    # -- the reconcile loop ---------------------------------------------------------

    def _changed(self) -> None:
        """etcd changed: reconcile, and tell whoever watches a job's status."""
        self._wake.set()
        self.progress.notify()

    def wake(self) -> None:
        """Run a reconcile pass now."""
        self._wake.set()

    def wait(self, timeout: float = RECONCILE_INTERVAL_S) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def reconcile(self, wait: bool = False) -> None:
        """Queue one pass over every job on its lane. Called by the leader only."""
        self.reconciles += 1
        futures = [
            self.lanes.submit(
                job_id, lambda j=job_id: self._guarded(j, self._reconcile_job, j), "r"
            )
            for job_id in self.job_ids()
        ]
        if wait:
            for f in futures:
                f.result()

    def _guarded(self, job_id: str, fn: Callable, *args) -> None:
        """Run one piece of a job's work; sort what it raises into retry or the job's end."""
        try:
            fn(*args)
            self._failing_since.pop(job_id, None)
        except JobNotFound:
            return
        except NotLeading as exc:
            log.info("event=not_leading job=%s detail=%s", job_id, exc)
        except Exception as exc:
            if is_terminal(exc):
                self._fail(job_id, f"{exc}")
            elif is_retryable(exc):
                log.warning("event=job_retry job=%s error=%s: %s", job_id, type(exc).__name__, exc)
                self._wake_later(RECONCILE_INTERVAL_S)
            else:
                log.exception("event=job_error job=%s", job_id)
                first = self._failing_since.setdefault(job_id, time.monotonic())
                if time.monotonic() - first > BUG_GIVE_UP_S:
                    self._fail(job_id, f"controller error for {BUG_GIVE_UP_S:g}s: {exc}")
                else:
                    self._wake_later(RECONCILE_INTERVAL_S)

    def _fail(self, job_id: str, message: str) -> None:
        try:
            self._end(job_id, FAILED, message)
        except Exception:
            log.exception("event=job_fail_failed job=%s", job_id)

    def _reconcile_job(self, job_id: str) -> None:
        snap = self.snapshot(job_id)
        if snap.record.state in TERMINAL or not self._is_leader:
            return
        cluster = self.suspicions.without_dead(self.view.cluster())
        if job_id not in self.adopted and snap.generation is not None:
            self._adopt(snap, cluster)
            snap = self.snapshot(job_id)
        action = decide(snap, cluster)
        if snap.generation is not None:
            restarts = {w: r.restarts for w, r in snap.workers.items()}
            self.figures.saw_restarts(job_id, snap.generation.number, restarts, time.time())
        if isinstance(action, Seal):
            current = snap.generation.worker_ids if snap.generation else frozenset()
            heard = {w: (p.generation, p.at) for w, p in self.progress.of(job_id).items()}
            running = running_members(snap.generation, heard, time.time())
            now, wait = self.joins.due(
                job_id, action, current, running, snap.spec, time.monotonic()
            )
            if now is not None:
                sealing.seal(self, snap, cluster, now)
            else:
                self._wake_later(wait)
            return
        self.joins.forget(job_id)
        if isinstance(action, Complete):
            self._start_background(job_id, lambda: self._complete(job_id))
        elif isinstance(action, Fail):
            live = self.progress.live(snap.record)
            self._finish(snap, live.evolve(state=FAILED, message=action.message))
        elif isinstance(action, Wait) and (
            snap.record.state != WAITING or snap.record.message != action.message
        ):
            record = snap.record.evolve(state=WAITING, message=action.message)
            self.writer.update(snap, [self.record_put(record)])

    def _wake_later(self, delay: float) -> None:
        timer = threading.Timer(max(delay, 0.01), self._wake.set)
        timer.daemon = True
        timer.start()

    # -- effects ------------------------------------------------------------------

    def record_put(self, record: JobRecord) -> Put:
        status = record.evolve(updated_at=time.time()).to_json()
        return Put(self.keys.job_status(record.job_id), status)

    def registered_ps(self) -> dict[str, str]:
        return dict(self.view.cluster().ps)

    def _adopt(self, snap: JobSnapshot, cluster: ClusterSnapshot) -> None:
        """A new leader points the running generation's workers at itself."""
        ops = adoption_ops(snap, cluster, self.keys, self.address, self.checkpoint_url, self.mint)
        self.writer.update(snap, ops, generation=True)
        self.adopted.add(snap.record.job_id)
        log.info(
            "event=job_adopted job=%s generation=%d", snap.record.job_id, snap.generation.number
        )

    def _start_background(self, job_id: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a checkpoint, a completion) off the lanes: its storage I/O must not
        hold up the job's reconcile passes."""
        self.background.start(job_id, fn, self._wake.set)

    def _complete(self, job_id: str) -> None:
        checkpoints.take_checkpoint(self, job_id)
        self._on_lane(job_id, lambda: self._end(job_id, COMPLETED, "completed"))

    def _end(self, job_id: str, state: str, message: str) -> JobRecord:
        """Move a job that has not ended yet to ``state``, with its progress as reported."""
        snap = self.snapshot(job_id)
        if snap.record.state not in TERMINAL:
            live = self.progress.live(snap.record)
            self._finish(snap, live.evolve(state=state, message=message))
        return self.snapshot(job_id).record

    def _finish(self, snap: JobSnapshot, record: JobRecord) -> None:
        """Move a job to a terminal state, withdraw its assignments, free its shards."""
        self.writer.update(snap, finish_ops(snap, record, self.keys))
        log.info(
            "event=job_finished job=%s state=%s step=%d loss=%.4f",
            record.job_id,
            record.state,
            record.step,
            record.loss,
        )
        release_shards(record.job_id, snap.placement, self.registered_ps())
        self.figures.forget(record.job_id)
        self.scalars.forget(record.job_id)
