"""Sharded checkpoints in object storage (fsspec): safe shard bytes, manifests, the store.

A checkpoint exists only when its manifest exists; see ``store`` for how the
manifest is committed last and atomically, and ``serialize`` for the pickle-free
shard format. The shard codec needs torch and is imported on first use, so the
controller can list, choose and commit checkpoints without importing torch.
"""

from elasticd.checkpoint.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    CheckpointError,
    CheckpointExists,
    CheckpointManifest,
    CorruptShard,
    ManifestError,
    ShardRecord,
    StaleGeneration,
    choose_checkpoint,
)
from elasticd.checkpoint.store import CheckpointStore, StorageBackend, register_backend

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointManifest",
    "CheckpointStore",
    "CorruptShard",
    "ManifestError",
    "ShardFormatError",
    "ShardRecord",
    "StaleGeneration",
    "StorageBackend",
    "choose_checkpoint",
    "decode_shard",
    "encode_shard",
    "register_backend",
]

_SERIALIZE = ("ShardFormatError", "decode_shard", "encode_shard")


def __getattr__(name: str):
    if name in _SERIALIZE:
        from elasticd.checkpoint import serialize

        return getattr(serialize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
