"""Checkpoint manifests: what a checkpoint contains, and which one to load.

A checkpoint exists only when its manifest exists (ARCHITECTURE.md, invariant 4).
The manifest names every shard file with its size and SHA-256, so a loader can
tell a complete checkpoint from a half-written or damaged one without trusting
anything else in storage.

This module is plain data and pure decisions: no I/O. The manifest is JSON,
parsed with ``json`` and checked field by field; nothing is evaluated or
unpickled (invariant 7).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MANIFEST_FORMAT = 1
"""Version of the manifest JSON layout; bumped on incompatible changes."""

MANIFEST_NAME = "MANIFEST.json"
"""File name of the manifest inside a checkpoint directory."""

MAX_STEP = 10**12 - 1
"""Largest step that fits the 12-digit step directory name."""

# Job ids and shard names become path components in storage: keep them to a
# conservative alphabet so no id can climb out of its directory.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(Exception):
    """Base class of all checkpoint errors."""


class ManifestError(CheckpointError, ValueError):
    """A manifest is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"manifest field {field!r}: {problem}")
        self.field = field
        self.problem = problem


class CheckpointExists(CheckpointError):
    """A manifest for this job and step is already committed."""


class StaleGeneration(CheckpointError):
    """A commit was refused: a newer generation has committed, or the shards it names are gone."""


class CorruptShard(CheckpointError):
    """A shard is missing, or its size or checksum does not match its manifest."""


def check_name(field_name: str, value: object) -> str:
    """Return ``value`` if it is usable as a job id or shard name, else raise ManifestError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ManifestError(
            field_name,
            f"must be 1-128 characters of [A-Za-z0-9._-] not starting with '.', '_' or '-', "
            f"got {value!r}",
        )
    return value


def check_step(field_name: str, value: object) -> int:
    """Return ``value`` if it is a valid step number, else raise ManifestError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise ManifestError(field_name, f"must be an integer in [0, {MAX_STEP}], got {value!r}")
    return value


def _check_count(field_name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(field_name, f"must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ShardRecord:
    """One shard file of a checkpoint, as the manifest promises it."""

    name: str
    """Logical shard name, e.g. ``"ps-0"``; unique within a checkpoint."""
    path: str
    """File name relative to the checkpoint directory."""
    sha256: str
    """Lower-case hex SHA-256 of the file's bytes."""
    size: int
    """File size in bytes."""

    def __post_init__(self) -> None:
        check_name("name", self.name)
        check_name("path", self.path)
        if self.path == MANIFEST_NAME:
            raise ManifestError("path", f"{MANIFEST_NAME!r} is reserved for the manifest")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ManifestError("sha256", f"must be 64 lower-case hex digits, got {self.sha256!r}")
        _check_count("size", self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class CheckpointManifest:
    """A committed checkpoint: the job, the step (its id), the writer's generation, the shards.

    ``extra`` carries JSON-able job state that is not tensors: training mode,
    loss, the record of finished data shards (invariant 6), and so on. Tuples in
    it come back as lists after a JSON round trip.
    """

    job_id: str
    step: int
    generation: int
    created_at: float
    shards: tuple[ShardRecord, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("job_id", self.job_id)
        check_step("step", self.step)
        _check_count("generation", self.generation)
        if isinstance(self.created_at, bool) or not isinstance(self.created_at, (int, float)):
            raise ManifestError("created_at", f"must be a number, got {self.created_at!r}")
        if not math.isfinite(self.created_at):
            raise ManifestError("created_at", f"must be finite, got {self.created_at!r}")
        object.__setattr__(self, "created_at", float(self.created_at))
        if not isinstance(self.shards, (tuple, list)):
            raise ManifestError("shards", f"must be a sequence, got {type(self.shards).__name__}")
        object.__setattr__(self, "shards", tuple(self.shards))
        names: set[str] = set()
        paths: set[str] = set()
        for i, shard in enumerate(self.shards):
            if not isinstance(shard, ShardRecord):
                raise ManifestError(f"shards[{i}]", f"must be a ShardRecord, got {shard!r}")
            if shard.name in names:
                raise ManifestError(f"shards[{i}].name", f"duplicate shard name {shard.name!r}")
            if shard.path in paths:
                raise ManifestError(f"shards[{i}].path", f"duplicate shard path {shard.path!r}")
            names.add(shard.name)
            paths.add(shard.path)
        if not isinstance(self.extra, dict):
            raise ManifestError("extra", f"must be an object, got {type(self.extra).__name__}")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ManifestError("extra", f"must be JSON-serialisable: {exc}") from None

    def shard(self, name: str) -> ShardRecord:
        """The record of shard ``name``; KeyError if the checkpoint has no such shard."""
        for record in self.shards:
            if record.name == name:
                return record
        raise KeyError(f"checkpoint {self.job_id}@{self.step} has no shard {name!r}")

    def to_json(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "job_id": self.job_id,
            "step": self.step,
            "generation": self.generation,
            "created_at": self.created_at,
            "shards": [s.to_dict() for s in self.shards],
            "extra": self.extra,
        }
        return json.dumps(document, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> CheckpointManifest:
        """Parse and validate a manifest; raise ManifestError naming the first bad field."""
        try:
            document = json.loads(data, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError("<document>", f"not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise ManifestError("<document>", "must be a JSON object")
        if "format" not in document:
            raise ManifestError("format", "missing")
        if document["format"] != MANIFEST_FORMAT:
            raise ManifestError(
                "format", f"unsupported version {document['format']!r}, expected {MANIFEST_FORMAT}"
            )
        required = ("job_id", "step", "generation", "created_at", "shards", "extra")
        for key in required:
            if key not in document:
                raise ManifestError(key, "missing")
        unknown = sorted(set(document) - set(required) - {"format"})
        if unknown:
            raise ManifestError(unknown[0], "unknown field")
        raw_shards = document["shards"]
        if not isinstance(raw_shards, list):
            raise ManifestError("shards", "must be a list")
        shards = tuple(_shard_from_dict(i, raw) for i, raw in enumerate(raw_shards))
        return cls(
            job_id=document["job_id"],
            step=document["step"],
            generation=document["generation"],
            created_at=document["created_at"],
            shards=shards,
            extra=document["extra"],
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _shard_from_dict(index: int, raw: object) -> ShardRecord:
    where = f"shards[{index}]"
    if not isinstance(raw, dict):
        raise ManifestError(where, "must be an object")
    keys = ("name", "path", "sha256", "size")
    for key in keys:
        if key not in raw:
            raise ManifestError(f"{where}.{key}", "missing")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ManifestError(f"{where}.{unknown[0]}", "unknown field")
    try:
        return ShardRecord(
            name=raw["name"], path=raw["path"], sha256=raw["sha256"], size=raw["size"]
        )
    except ManifestError as exc:
        raise ManifestError(f"{where}.{exc.field}", exc.problem) from None


def choose_checkpoint(
    manifests: Iterable[CheckpointManifest],
    verify: Callable[[CheckpointManifest], bool],
) -> CheckpointManifest | None:
    """The newest manifest that ``verify`` accepts, or None.

    Manifests may come in any order. They are tried newest step first (ties:
    higher generation first), so when the newest checkpoint's shards are missing
    or corrupt the one before it is chosen (invariant 4).
    """
    ordered = sorted(manifests, key=lambda m: (m.step, m.generation, m.created_at), reverse=True)
    for manifest in ordered:
        if verify(manifest):
            return manifest
    return None
