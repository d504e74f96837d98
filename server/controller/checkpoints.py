"""Checkpoints of ps-async jobs: the PS tier writes shards, the controller the manifest.

(allreduce jobs' ranks write their own: :mod:`.rank_checkpoints`.)

Shards first, each with a checksum, written by the PS servers that hold them;
the manifest last, created atomically by the checkpoint store (ARCHITECTURE
invariant 4). The manifest carries the generation, so a controller acting for
a stale generation cannot commit over a newer one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

from elasticd.checkpoint import (
    CheckpointError,
    CheckpointExists,
    CheckpointManifest,
    CheckpointStore,
    ShardRecord,
)
from elasticd.coord.etcd import Put
from elasticd.placement import ShardPlacement
from elasticd.ps_client import PSTier
from elasticd.server.controller.planning import JobSnapshot, ps_trouble
from elasticd.server.controller.records import RUNNING

log = logging.getLogger(__name__)


def checkpoint_due(snap: JobSnapshot, step: int, now: float) -> bool:
    """Whether a worker's report of ``step`` at ``now`` calls for a periodic checkpoint."""
    spec, rec = snap.spec.checkpoint, snap.record
    if rec.mode != "ps-async" or step <= rec.checkpoint_step:
        return False
    by_steps = bool(spec.every_steps) and step - rec.checkpoint_step >= spec.every_steps
    since = rec.checkpoint_at or rec.submitted_at
    by_time = bool(spec.every_s) and now - since >= spec.every_s
    return by_steps or by_time


def checkpoint_ps_job(
    snap: JobSnapshot,
    placement: ShardPlacement,
    ps_addresses: Mapping[str, str],
    url: str,
    extra: dict | None = None,
) -> tuple[CheckpointManifest | None, str]:
    """Snapshot every shard, then commit the manifest. (None, "") if nothing new."""
    job_id, gen = snap.record.job_id, snap.generation
    tier = PSTier(job_id, gen.number, placement, ps_addresses)
    try:
        step = max(i.version for i in tier.info().values())
        if step <= snap.record.checkpoint_step and snap.record.checkpoint:
            return None, ""
        replies = tier.snapshot(url, step)
    finally:
        tier.close()
    manifest = CheckpointManifest(
        job_id=job_id,
        step=step,
        generation=gen.number,
        created_at=time.time(),
        shards=tuple(ShardRecord(p, r.path, r.sha256, r.size) for p, r in sorted(replies.items())),
        extra={
            "mode": snap.record.mode,
            "optimizer": snap.spec.optimizer.name,
            "versions": {p: r.version for p, r in replies.items()},
            # each shard's applied batches ([start, end, ...]): the data queue restarts from them
            "applied": {p: list(r.applied) for p, r in replies.items()},
            "placement": json.loads(placement.to_json()),
            **(extra or {}),
        },
    )
    try:
        where = CheckpointStore(url).commit(manifest)
    except CheckpointExists:
        return None, ""
    except CheckpointError as exc:
        log.warning("event=checkpoint_refused job=%s step=%d error=%s", job_id, step, exc)
        return None, ""
    log.info(
        "event=checkpoint_committed job=%s generation=%d step=%d url=%s",
        job_id,
        gen.number,
        step,
        where,
    )
    return manifest, where


def take_checkpoint(controller, job_id: str) -> CheckpointManifest | None:
    """Write a checkpoint of a ps-async job, then record it in the job's record.

    The storage I/O (PS snapshots, the manifest) runs on the caller's thread,
    off the job's lane; only the record update goes through the lane, as a
    conditional write like any other.
    """
    snap = controller.snapshot(job_id)
    if snap.generation is None or snap.placement is None or snap.record.mode != "ps-async":
        return None
    if ps_trouble(snap, controller.view.cluster()):
        return None  # a PS is gone or lost the job: there is no whole state to keep
    live = controller.progress.live(snap.record)
    url = snap.spec.checkpoint.url or controller.checkpoint_url
    started = time.monotonic()
    manifest, where = checkpoint_ps_job(
        snap, snap.placement, controller.view.cluster().ps, url, extra={"loss": live.loss}
    )
    if manifest is None:
        return None
    nbytes = sum(s.size for s in manifest.shards)
    controller.figures.checkpointed(job_id, time.monotonic() - started, nbytes)
    record_checkpoint(controller, job_id, manifest, where, url, snap.spec.checkpoint.keep)
    return manifest


def record_checkpoint(
    controller, job_id: str, manifest: CheckpointManifest, where: str, url: str, keep: int
) -> None:
    """Name a committed checkpoint in the job's record (on its lane), then apply retention."""

    def record():
        fresh = controller.snapshot(job_id)
        if manifest.generation < fresh.record.restored_generation:
            return fresh.record  # taken before a restore: not the job's state any more
        if not (fresh.record.checkpoint_step >= manifest.step and fresh.record.checkpoint):
            updated = fresh.record.evolve(
                checkpoint=where,
                checkpoint_step=manifest.step,
                checkpoint_at=manifest.created_at,
                step=max(fresh.record.step, manifest.step),
                updated_at=time.time(),
            )
            controller.writer.update(
                fresh, [Put(controller.keys.job_status(job_id), updated.to_json())]
            )
        return controller.snapshot(job_id).record

    controller._on_lane(job_id, record)
    if keep:
        CheckpointStore(url).prune(job_id, keep, verified=manifest)


class NotCheckpointable(Exception):
    """The job has no state to checkpoint now (not running, or a script job)."""


def checkpoint_now(controller, job_id: str) -> CheckpointManifest | None:
    """A checkpoint of a running job, after the one under way (if any). Raises NotCheckpointable."""
    snap = controller.snapshot(job_id)
    rec = snap.record
    if rec.mode not in ("ps-async", "allreduce"):
        raise NotCheckpointable(
            f"job {job_id} is {rec.mode}: only ps-async and allreduce jobs checkpoint"
        )
    if rec.state != RUNNING or snap.generation is None or not snap.generation.members:
        raise NotCheckpointable(f"job {job_id} is {rec.state}: only a running job checkpoints")
    if rec.mode == "allreduce":
        if not controller.rank_checkpoints.take_now(controller, job_id):
            raise NotCheckpointable(
                f"job {job_id}: its ranks wrote no checkpoint in time (see the controller log)"
            )
        return None
    return controller.background.run(job_id, lambda: take_checkpoint(controller, job_id))


def final_checkpoint(controller, job_id: str) -> None:
    """Before a cancel: keep the job's last state, so --resume-from can pick it up. Best effort:
    a PS that is gone or does not answer costs the checkpoint, never the cancel."""
    try:
        checkpoint_now(controller, job_id)
    except NotCheckpointable:
        return
    except Exception as exc:
        log.warning(
            "event=final_checkpoint_failed job=%s error=%s: %s", job_id, type(exc).__name__, exc
        )
