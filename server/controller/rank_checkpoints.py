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
from elasticd.server.controller.admission import tensor_specs
from elasticd.server.controller.checkpoints import record_checkpoint

log = logging.getLogger(__name__)


class BadShardReport(ValueError):
    """A rank's report does not describe a slice of a checkpoint of this job."""


class RankCheckpoints:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (job, generation, step, world, url) -> rank -> (shard, data position)
        self._pending: dict[tuple, dict[int, tuple[ShardRecord, int]]] = {}

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
                    rank_placement(tensor_specs(snap.spec), report.world_size).to_json()
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
