"""Restoring a ps-async job's PS tier from its newest verified checkpoint.

When a placed parameter server is gone (its lease expired) or came back
empty (a new boot id), the slices it held are lost. The controller then:

1. places the whole job again on the live PS tier (:func:`restore_placement`,
   a pure function of the tensors and the live tier);
2. reads the newest checkpoint whose every shard verifies (an older one when
   the newest is corrupt or half written; invariant 4);
3. joins its shards into whole parameters and torch.optim state, cuts them
   for the new placement, and imports them into every PS at the generation
   about to be sealed, with the checkpoint's step as their version;
4. seals that generation with the new placement, in one transaction.

Every slice comes back from the same checkpoint, surviving ones included, so
parameters, optimizer state, step and data position stay one consistent cut.
The updates applied after that checkpoint are lost, and the job's record says
how many. An import is idempotent: a controller that dies between the import
and the seal imports again, at the same generation, on the next pass.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from elasticd.checkpoint import CheckpointManifest, CheckpointStore, CorruptShard, ShardRecord
from elasticd.checkpoint.locate import (
    NoSuchCheckpoint,
    check_fits,
    check_optimizer,
    load_state,
    locate,
    saved_placement,
)
from elasticd.coord.election import NotLeading
from elasticd.coord.etcd import Put
from elasticd.jobspec import JobSpec
from elasticd.membership import Generation
from elasticd.placement import ShardPlacement, TensorSpec, place, rehome
from elasticd.ps_client import PSTier
from elasticd.ps_errors import PSUnavailable
from elasticd.security.storage import StoragePolicy, StorageRefused
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot
from elasticd.server.controller.records import WAITING, JobRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    manifest: CheckpointManifest
    url: str  # the manifest's URL
    placement: ShardPlacement  # where the state now lives


def restore_placement(
    tensors: list[TensorSpec],
    live_ps: Mapping[str, str],
    incarnations: Mapping[str, str],
    replicas: int = 1,
    manifest: CheckpointManifest | None = None,
) -> ShardPlacement:
    """The job's slices spread over every live PS, each named with its boot id.

    A ps-async checkpoint with at least as many groups as there are live PS
    keeps its groups (:func:`~elasticd.placement.rehome`): each comes back with
    its own version and applied batches, so exactly-once data holds across the
    restore. Otherwise the slices are placed afresh and the state is cut for them.
    """
    if manifest is not None and manifest.extra.get("mode") == "ps-async":
        saved = saved_placement(manifest)
        if len(saved.groups) >= len(live_ps):
            return rehome(saved, sorted(live_ps), replicas).with_incarnations(incarnations)
    return place(tensors, sorted(live_ps), replicas=replicas).with_incarnations(incarnations)


def combined_digest(per_ps: Mapping[str, str]) -> str:
    return hashlib.sha256("".join(per_ps[p] for p in sorted(per_ps)).encode()).hexdigest()


def tier_digest(placement: ShardPlacement, params: dict, named: dict) -> str:
    """The digest a PS tier holding ``params`` and ``named`` state on ``placement`` reports."""
    from elasticd.checkpoint.serialize import state_digest
    from elasticd.slicing import split_state

    parts = split_state(placement, params, named)
    return combined_digest({p: state_digest(t, st, keys) for p, (t, st, keys) in parts.items()})


def restore_source(
    snap: JobSnapshot, default_url: str, storage: StoragePolicy | None = None
) -> tuple[CheckpointStore, CheckpointManifest]:
    """What a restore reads: the checkpoint the user named for a job's start (--resume-from),
    else the job's own newest verified checkpoint. Raises NoSuchCheckpoint, and
    StorageRefused (reading nothing) if the job names storage that ``storage`` does not
    allow: checked at submit, and again here as the allowed roots may have narrowed since."""
    rec = snap.record
    if storage is not None:
        storage.check("checkpoint.url", snap.spec.checkpoint.url)
        storage.check("resume_from", rec.resume_from)
    if snap.placement is None and rec.resume_from:
        return locate(rec.resume_from, default_url)
    url = snap.spec.checkpoint.url or default_url
    store = CheckpointStore(url)
    manifest = store.latest(rec.job_id)
    if manifest is None and rec.resume_from:  # none of its own yet: where it started from
        return locate(rec.resume_from, default_url)
    if manifest is None:
        raise NoSuchCheckpoint(f"job {rec.job_id} has no verified checkpoint under {url}")
    return store, manifest


def restore_tier(
    spec: JobSpec,
    job_id: str,
    generation: int,
    world_size: int,
    placement: ShardPlacement,
    ps_addresses: Mapping[str, str],
    store: CheckpointStore,
    manifest: CheckpointManifest,
) -> Restored:
    """Import checkpoint ``manifest`` into ``placement`` at ``generation``.

    Raises PSUnavailable when a PS does not answer (the caller retries), and
    CorruptShard when a shard changed since it was verified (the next try
    picks an older checkpoint).
    """
    tier = PSTier(job_id, generation, placement, {p: ps_addresses[p] for p in placement.ps_ids})
    try:
        held = _restore_direct(spec, tier, world_size, store, manifest)
        if held is None:
            held = _restore_through_controller(spec, tier, world_size, store, manifest)
    finally:
        tier.close()
    where = store.url_of(manifest)
    log.info(
        "event=job_restored job=%s generation=%d step=%d checkpoint=%s bytes_per_ps=%s digest=%s",
        job_id,
        generation,
        manifest.step,
        where,
        placement.bytes_per_ps(),
        combined_digest(held),
    )
    return Restored(manifest, where, placement)


def direct_sources(
    placement: ShardPlacement, manifest: CheckpointManifest
) -> dict[str, ShardRecord] | None:
    """The stored shard holding exactly each group's slices, or None if a group has none
    (the checkpoint was cut for another placement)."""
    saved = saved_placement(manifest)

    def slices(p: ShardPlacement, group: str) -> tuple:
        return tuple((s.key, s.dtype, tuple(s.shape)) for s in p.in_group(group))

    stored = {slices(saved, g): g for g in saved.groups}
    out = {}
    for group in placement.groups:
        name = stored.get(slices(placement, group))
        if name is None:
            return None
        out[group] = manifest.shard(name)
    return out


def _restore_direct(
    spec: JobSpec, tier: PSTier, world_size: int, store: CheckpointStore, manifest
) -> dict[str, str] | None:
    """Every PS reads its groups' shards from storage itself, in parallel; the digests its
    groups hold. None when the checkpoint's cut does not fit the placement, or a PS could
    not read a shard (the controller then reads them, and finds out which is true)."""
    sources = direct_sources(tier.placement, manifest)
    if sources is None:
        return None
    # Each group comes back at the version its shard was snapshotted at: a shard's
    # version counts the updates its state holds (one per batch in bounded staleness),
    # and the shards of one checkpoint are snapshotted one after another.
    saved = manifest.extra.get("versions", {})
    versions = {g: int(saved.get(r.name, manifest.step)) for g, r in sources.items()}
    try:
        return tier.restore_from(
            sources,
            store.url,
            spec.optimizer.name,
            spec.optimizer.kwargs,
            spec.ps.max_staleness,
            workers=world_size,
            max_version=spec.steps,
            version=versions,
            checkpoint=(manifest.job_id, manifest.step),
        )
    except CorruptShard as exc:
        log.warning("event=direct_restore_failed job=%s error=%s", tier.job_id, exc)
        return None


def _restore_through_controller(
    spec: JobSpec, tier: PSTier, world_size: int, store: CheckpointStore, manifest
) -> dict[str, str]:
    """Read the whole checkpoint here, cut it for the placement, and import each group."""
    from elasticd.slicing import split_state  # torch: the one place the controller holds state

    params, named = load_state(store, manifest)
    digests = tier.import_state(
        split_state(tier.placement, params, named),
        spec.optimizer.name,
        spec.optimizer.kwargs,
        spec.ps.max_staleness,
        workers=world_size,
        max_version=spec.steps,
        version=manifest.step,
    )
    differ = sorted(p for p, (sent, held) in digests.items() if sent != held)
    if differ:
        raise CorruptShard(f"parameter servers {differ} hold other state than was restored")
    return {p: held for p, (_, held) in digests.items()}


def restore_for_seal(
    snap: JobSnapshot,
    tensors: list[TensorSpec],
    cluster: ClusterSnapshot,
    gen: Generation,
    record: JobRecord,
    default_url: str,
    live: JobRecord,
    storage: StoragePolicy | None = None,
) -> tuple[ShardPlacement, JobRecord]:
    """Restore ``snap``'s job (parameters ``tensors``) onto the live PS tier for ``gen``.

    Returns the new placement and ``record`` (the sealed record) saying where
    the job restarted from and how many applied updates (after ``live.step``)
    were lost. Raises NoSuchCheckpoint when no checkpoint verifies or fits.
    """
    store, manifest = restore_source(snap, default_url, storage)
    check_fits(manifest, tensors)
    check_optimizer(manifest, snap.spec.optimizer.name)
    servers = {p: cluster.ps[p] for p in cluster.ps_open} or cluster.ps  # none draining
    placement = restore_placement(
        tensors, servers, cluster.ps_incarnations, snap.spec.ps.replicas, manifest
    )
    restored = restore_tier(
        snap.spec,
        snap.record.job_id,
        gen.number,
        gen.world_size,
        placement,
        cluster.ps,
        store,
        manifest,
    )
    step = restored.manifest.step
    return placement, record.evolve(
        step=step,
        checkpoint=restored.url,
        checkpoint_step=step,
        restored_from=restored.url,
        restored_generation=gen.number,
        restored_step=step,
        updates_lost=record.updates_lost + max(live.step - step, 0),
    )


RETRY_S = (1.0, 60.0)  # a failed restore is tried again after this long, doubling: first, longest


class RestoreBackoff:
    """When a job's failed restore may be tried again. In memory: a new leader tries at once."""

    def __init__(self) -> None:
        self._next: dict[str, tuple[float, float]] = {}  # job -> (not before, last delay)

    def wait(self, job_id: str, now: float) -> float:
        return max(self._next.get(job_id, (0.0, 0.0))[0] - now, 0.0)

    def failed(self, job_id: str, now: float) -> float:
        delay = min(self._next.get(job_id, (0.0, RETRY_S[0] / 2))[1] * 2, RETRY_S[1])
        self._next[job_id] = (now + delay, delay)
        return delay

    def succeeded(self, job_id: str) -> None:
        self._next.pop(job_id, None)


def restore_in_seal(controller, snap, cluster, gen, record, reason: str):
    """The restore part of a seal: (placement, sealed record), or None to seal nothing now.

    Marks the restore as under way in the job record first (a conditional
    write, like every write), so that a half-done restore is finished by the
    next pass or the next leader. A failure (storage, a PS, a checkpoint that
    changed) leaves the job waiting with the reason, tried again with backoff.
    """
    job_id = snap.record.job_id
    now = time.monotonic()
    if controller.restores.wait(job_id, now) > 0:
        controller._wake_later(controller.restores.wait(job_id, now))
        return None
    held_by = snap.placement.ps_ids if snap.placement is not None else ()
    missing = sorted(p for p in held_by if p not in cluster.ps)
    grace = controller.startup_grace_s - (now - controller.leading_since)
    if missing and grace > 0:
        # Just took the lead, as after a whole-cluster restart: give the job's PS the
        # moment they need to register rather than pile its state onto the first ones up.
        log.info("event=restore_waits_for_ps job=%s ps=%s for_s=%.1f", job_id, missing, grace)
        controller._wake_later(grace)
        return None
    if snap.record.restore_pending != gen.number:
        intent = snap.record.evolve(restore_pending=gen.number, updated_at=time.time())
        controller.writer.update(snap, [Put(controller.keys.job_status(job_id), intent.to_json())])
        snap = controller.snapshot(job_id)
        record = record.evolve(restore_pending=gen.number)
    if not controller._still_leading():  # a deposed leader must not import
        raise NotLeading("leadership lost before the restore")
    try:
        placement, record = restore_for_seal(
            snap,
            controller.shapes.of(snap),
            cluster,
            gen,
            record,
            controller.checkpoint_url,
            controller.progress.live(snap.record),
            controller.storage,
        )
    except (NoSuchCheckpoint, CorruptShard, PSUnavailable, StorageRefused) as exc:
        delay = controller.restores.failed(job_id, now)
        message = f"{reason}; the restore failed, trying again in {delay:g}s: {exc}"
        waiting = snap.record.evolve(state=WAITING, message=message, updated_at=time.time())
        controller.writer.update(snap, [Put(controller.keys.job_status(job_id), waiting.to_json())])
        controller._wake_later(delay)
        return None
    controller.restores.succeeded(job_id)
    return snap, placement, record
