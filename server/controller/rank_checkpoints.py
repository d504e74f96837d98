"""Committing allreduce checkpoints: every rank wrote its slice, the controller names them.

Each rank of an allreduce job writes its slice of the replica for a step
(``worker/runtime/checkpointing.py``) and reports it here. Once every rank of
the generation has reported the same step, the controller commits the
manifest: the shards with their checksums, the rank placement they were cut
by, the optimizer and the data position, in the layout a ps-async
checkpoint has (so either mode restores from either). The commit is the
store's conditional create, refused for a generation older than one already
committed (invariant 3), and only then does the job's record name it.

Reports wait in this process's memory: a leader that changes meanwhile
costs that one checkpoint, never a wrong one.

The ranks checkpoint on their own every ``checkpoint.every_steps``. The
other triggers come from the controller: ``checkpoint.every_s``, a user's
``elasticd checkpoint`` and a cancel. The answer to a rank's progress report
then asks for one (``ProgressAck.checkpoint``). The ranks agree on the step
in their next step's control all-reduce, so they all cut the same step. A
request stays open until a checkpoint of a later step than the one the job
had reached is recorded, and is asked again every ``ASK_AGAIN_S`` until then
(a rank skips one while its previous checkpoint is still being written).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from elasticd.checkpoint import (
    CheckpointError,
    CheckpointExists,
    CheckpointManifest,
    CheckpointStore,
    ShardRecord,
)
from elasticd.placement import rank_placement
from elasticd.rpc import job_pb2
from elasticd.server.controller.checkpoints import record_checkpoint
from elasticd.server.controller.records import RUNNING

log = logging.getLogger(__name__)


class BadShardReport(ValueError):
    """A rank's report does not describe a slice of a checkpoint of this job."""


ASK_AGAIN_S = 10.0  # an open request is asked for again after this long without a checkpoint
TAKE_NOW_WAIT_S = 300.0  # how long `elasticd checkpoint` and a cancel wait for the checkpoint
SILENCE_S = 30.0  # a job none of whose ranks reported for this long is not training


class RankCheckpoints:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (job, generation, step, world, url) -> rank -> (shard, data position)
        self._pending: dict[tuple, dict[int, tuple[ShardRecord, int]]] = {}
        self._requests: dict[str, int] = {}  # job -> the step a checkpoint must be newer than
        self._asked: dict[str, float] = {}  # job -> when its ranks were last asked

    def request(self, job_id: str, after_step: int) -> None:
        """Ask the job's ranks for a checkpoint of a step after ``after_step``."""
        with self._lock:
            self._requests[job_id] = max(self._requests.get(job_id, -1), after_step)
            self._asked.pop(job_id, None)  # ask at the next report

    def take_now(self, controller, job_id: str, wait_s: float = TAKE_NOW_WAIT_S) -> bool:
        """Ask a running job's ranks for a checkpoint and wait until one of a later step
        than the job had reached is recorded.

        False at once when no rank of the job's generation reported within ``SILENCE_S``
        (none is training: nobody would hear the request), and False when none came
        within ``wait_s``, the ranks fell silent for ``SILENCE_S`` meanwhile, or the job
        stopped running.
        """
        snap = controller.snapshot(job_id)
        url = snap.spec.checkpoint.url or controller.checkpoint_url
        if not url or self._last_heard(controller, snap.record) is None:
            log.info("event=checkpoint_not_taken job=%s reason=no_rank_training", job_id)
            return False
        after = controller.progress.live(snap.record).step
        self.request(job_id, after)
        log.info("event=checkpoint_requested job=%s after_step=%d", job_id, after)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            rec = controller.snapshot(job_id).record
            if rec.checkpoint and rec.checkpoint_step > after:
                return True
            if rec.state != RUNNING:
                return False
            if self._last_heard(controller, rec) is None:
                log.warning("event=checkpoint_not_taken job=%s reason=ranks_silent", job_id)
                return False
            time.sleep(0.1)
        log.warning(
            "event=checkpoint_not_taken job=%s after_step=%d waited_s=%g", job_id, after, wait_s
        )
        return False

    @staticmethod
    def _last_heard(controller, rec) -> float | None:
        """When a rank of the job's current generation last reported, if within SILENCE_S."""
        now = time.time()
        heard = [
            p.at
            for p in controller.progress.of(rec.job_id).values()
            if p.generation == rec.generation and now - p.at <= SILENCE_S
        ]
        return max(heard, default=None)

    def wanted(self, snap, now: float) -> bool:
        """Whether the answer to a report of ``snap``'s job asks its ranks for a checkpoint."""
        rec, spec = snap.record, snap.spec.checkpoint
        if rec.mode != "allreduce" or rec.state != RUNNING:
            return False
        since = rec.checkpoint_at or rec.submitted_at
        with self._lock:
            after = self._requests.get(rec.job_id)
            if after is not None and rec.checkpoint_step > after and rec.checkpoint:
                del self._requests[rec.job_id]  # done
                after = None
            by_time = bool(spec.every_s) and now - since >= spec.every_s
            if after is None and not by_time:
                return False
            asked = self._asked.get(rec.job_id)
            # Once asked, not again until that checkpoint is recorded, or ASK_AGAIN_S
            # passed (every rank skipped it: one was still writing the previous one).
            if asked is not None and rec.checkpoint_at < asked and now - asked < ASK_AGAIN_S:
                return False
            self._asked[rec.job_id] = now
            return True

    def written(self, controller, report: job_pb2.ShardWritten) -> bool:
        """Take one rank's report; commit the checkpoint if it was the last. True if committed."""
        snap = controller.snapshot(report.job_id)  # JobNotFound for an unknown job
        rec = snap.record
        if rec.mode != "allreduce":
            raise BadShardReport(f"job {rec.job_id} trains in {rec.mode}: ranks write no shards")
        if not 0 <= report.rank < report.world_size:
            raise BadShardReport(f"rank {report.rank} is not in a world of {report.world_size}")
        if report.name != f"rank-{report.rank}":
            raise BadShardReport(f"rank {report.rank} must name its shard rank-{report.rank}")
        if report.generation > rec.generation or report.step < 1:
            raise BadShardReport(
                f"generation {report.generation} step {report.step}: not a step of this job "
                f"(at generation {rec.generation})"
            )
        url = snap.spec.checkpoint.url or controller.checkpoint_url
        if report.url != url:  # the controller writes the manifest there: the job's own store
            raise BadShardReport(
                f"url: {report.url[:200]!r} is not job {rec.job_id}'s checkpoint store"
            )
        try:
            shard = ShardRecord(report.name, report.path, report.sha256, report.size)
        except CheckpointError as exc:
            raise BadShardReport(str(exc)) from None
        key = (report.job_id, report.generation, report.step, report.world_size, report.url)
        with self._lock:
            ranks = self._pending.setdefault(key, {})
            ranks[report.rank] = (shard, report.position)
            if len(ranks) < report.world_size:
                return False
            del self._pending[key]
            for other in [k for k in self._pending if k[0] == key[0] and k[2] <= key[2]]:
                del self._pending[other]  # older or abandoned checkpoints of the job
        return self._commit(controller, snap, report, ranks)

    def _commit(self, controller, snap, report, ranks) -> bool:
        positions = {position for _, position in ranks.values()}
        if len(positions) != 1:
            log.warning(
                "event=checkpoint_refused job=%s step=%d reason=ranks differ on the data position",
                report.job_id,
                report.step,
            )
            return False
        manifest = CheckpointManifest(
            job_id=report.job_id,
            step=report.step,
            generation=report.generation,
            created_at=time.time(),
            shards=tuple(ranks[r][0] for r in sorted(ranks)),
            extra={
                "mode": "allreduce",
                "optimizer": snap.spec.optimizer.name,
                "placement": json.loads(
                    rank_placement(controller.shapes.of(snap), report.world_size).to_json()
                ),
                "position": positions.pop(),
                "world_size": report.world_size,
            },
        )
        try:
            where = CheckpointStore(report.url).commit(manifest)
        except CheckpointExists:
            return False
        except CheckpointError as exc:
            log.warning(
                "event=checkpoint_refused job=%s step=%d error=%s", report.job_id, report.step, exc
            )
            return False
        log.info(
            "event=checkpoint_committed job=%s generation=%d step=%d url=%s mode=allreduce",
            report.job_id,
            report.generation,
            report.step,
            where,
        )
        record_checkpoint(
            controller, report.job_id, manifest, where, report.url, snap.spec.checkpoint.keep
        )
        return True
