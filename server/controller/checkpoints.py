"""Checkpoints of ps-async jobs: the PS tier writes shards, the controller the manifest.

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
from elasticd.server.controller.planning import JobSnapshot

log = logging.getLogger(__name__)


def checkpoint_due(snap: JobSnapshot, step: int) -> bool:
    """Whether a worker's report of ``step`` calls for a periodic checkpoint."""
    every = snap.spec.checkpoint.every_steps
    rec = snap.record
    return bool(every) and rec.mode == "ps-async" and step - rec.checkpoint_step >= every


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
            "mode": snap.spec.mode,
            "versions": {p: r.version for p, r in replies.items()},
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
    live = controller.progress.live(snap.record)
    url = snap.spec.checkpoint.url or controller.checkpoint_url
    manifest, where = checkpoint_ps_job(
        snap, snap.placement, controller.view.cluster().ps, url, extra={"loss": live.loss}
    )
    if manifest is None:
        return None

    def record():
        fresh = controller.snapshot(job_id)
        if not (fresh.record.checkpoint_step >= manifest.step and fresh.record.checkpoint):
            updated = fresh.record.evolve(
                checkpoint=where,
                checkpoint_step=manifest.step,
                step=max(fresh.record.step, manifest.step),
                updated_at=time.time(),
            )
            controller.writer.update(
                fresh, [Put(controller.keys.job_status(job_id), updated.to_json())]
            )
        return controller.snapshot(job_id).record

    controller._on_lane(job_id, record)
    return manifest
