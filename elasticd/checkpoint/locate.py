"""Finding a checkpoint a user names: a job id, a checkpoint's URL, or its manifest's URL.

A checkpoint lives at ``<root>/<job_id>/<step, 12 digits>/MANIFEST.json``
(:mod:`elasticd.checkpoint.store`). A user may name it by that manifest URL,
by its directory, or by the job id alone (its newest verified checkpoint under
the cluster's checkpoint root). Whatever the name, the checkpoint returned has
had every shard verified.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from elasticd.checkpoint.manifest import MANIFEST_NAME, CheckpointError, CheckpointManifest
from elasticd.checkpoint.store import CheckpointStore
from elasticd.placement import ShardPlacement, TensorSpec


class NoSuchCheckpoint(CheckpointError):
    """The named checkpoint does not exist, or does not verify."""


def split_checkpoint_url(url: str) -> tuple[str, str, int] | None:
    """(root, job_id, step) of a checkpoint URL, or None if it is not one."""
    path = url.rstrip("/")
    if path.endswith("/" + MANIFEST_NAME):
        path = path[: -len(MANIFEST_NAME) - 1]
    head, _, step = path.rpartition("/")
    root, _, job_id = head.rpartition("/")
    if not (root and job_id and len(step) == 12 and step.isdigit()):
        return None
    return root, job_id, int(step)


def locate(ref: str, default_root: str) -> tuple[CheckpointStore, CheckpointManifest]:
    """The verified checkpoint ``ref`` names; raises NoSuchCheckpoint with the reason."""
    ref = ref.strip()
    if not ref:
        raise NoSuchCheckpoint("no checkpoint named")
    parts = split_checkpoint_url(ref)
    if parts is None:
        if "/" in ref or ":" in ref:
            raise NoSuchCheckpoint(
                f"{ref!r} is neither a job id nor a checkpoint URL "
                f"(<root>/<job_id>/<12-digit step>[/{MANIFEST_NAME}])"
            )
        store = CheckpointStore(default_root)
        manifest = store.latest(ref)
        if manifest is None:
            raise NoSuchCheckpoint(f"job {ref} has no verified checkpoint under {default_root}")
        return store, manifest
    root, job_id, step = parts
    store = CheckpointStore(root)
    found = [m for m in store.list_manifests(job_id) if m.step == step]
    if not found:
        raise NoSuchCheckpoint(f"no committed checkpoint at {ref}")
    if not store.verify(found[0]):
        raise NoSuchCheckpoint(f"checkpoint {ref} is corrupt: a shard does not verify")
    return store, found[0]


def saved_shapes(manifest: CheckpointManifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each parameter's (dtype, whole shape) as ``manifest``'s placement saved it."""
    saved = saved_placement(manifest)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for s in sorted(saved.slices, key=lambda s: (s.param, s.row_start)):
        if s.whole or s.param not in out:
            out[s.param] = (s.dtype, s.shape)
        else:
            dtype, shape = out[s.param]
            out[s.param] = (dtype, (shape[0] + s.shape[0], *shape[1:]))
    return out


def check_fits(manifest: CheckpointManifest, tensors: list[TensorSpec]) -> None:
    """Raise NoSuchCheckpoint unless ``manifest`` holds exactly the model ``tensors`` describe."""
    saved = saved_shapes(manifest)
    wanted = {t.name: (t.dtype, tuple(t.shape)) for t in tensors}
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name) != wanted.get(name):
            have = "missing" if name not in saved else f"{saved[name][0]}{list(saved[name][1])}"
            need = "absent" if name not in wanted else f"{wanted[name][0]}{list(wanted[name][1])}"
            raise NoSuchCheckpoint(
                f"checkpoint {manifest.job_id}@{manifest.step} does not fit this model: "
                f"parameter {name!r} is {have} in the checkpoint, {need} in the task"
            )


def check_optimizer(manifest: CheckpointManifest, optimizer: str) -> None:
    """Raise NoSuchCheckpoint if ``manifest`` holds another optimizer's state than ``optimizer``."""
    saved = manifest.extra.get("optimizer")
    if saved is not None and saved != optimizer:
        raise NoSuchCheckpoint(
            f"checkpoint {manifest.job_id}@{manifest.step} holds {saved} optimizer state, "
            f"the job uses {optimizer}: set optimizer.name: {saved}"
        )


def saved_placement(manifest: CheckpointManifest) -> ShardPlacement:
    """Which rows of which parameter each of ``manifest``'s shards holds."""
    return ShardPlacement.from_json(json.dumps(manifest.extra["placement"]))


def load_state(store: CheckpointStore, manifest: CheckpointManifest) -> tuple[dict, dict]:
    """The checkpoint's whole parameters and torch.optim state, by parameter name.

    Every shard is checked against the manifest as it is read (CorruptShard if not).
    """
    from elasticd.checkpoint.serialize import decode_shard  # torch: only a restore loads state
    from elasticd.slicing import join_slices

    names = [r.name for r in manifest.shards]
    if not names:
        return join_slices(saved_placement(manifest), {})
    # In parallel: reads, checksums and decoding all let go of the GIL.
    with ThreadPoolExecutor(min(len(names), 16), thread_name_prefix="shard-read") as pool:
        decoded = list(pool.map(lambda n: decode_shard(store.read_shard(manifest, n)), names))
    return join_slices(saved_placement(manifest), dict(zip(names, decoded, strict=True)))
