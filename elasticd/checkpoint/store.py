"""Checkpoint storage over fsspec: shards first, the manifest last and atomically.

Layout under the store URL::

    <url>/<job_id>/<step:012d>/<shard files>
    <url>/<job_id>/<step:012d>/MANIFEST.json

A checkpoint exists only when its manifest exists (ARCHITECTURE.md, invariant 4):
shards first, each under a fresh file name so two writers of one step never
overwrite each other's bytes; the manifest last, by conditional create, so of two
commits of one step exactly one wins. Loaders take the newest manifest whose
shards all verify. How to write durably and create exclusively comes from a
registry keyed by fsspec protocol; the store never branches on the backend:

* local files: temp file in the same directory, fsync, then ``os.link`` (fails
  if the name exists) for the manifest and ``os.replace`` for shards;
* ``s3``: ``open(mode="xb")``, which s3fs sends as ``If-None-Match: *``;
* ``memory``: check-and-write under a process-wide lock;
* anything else (``gs`` included): an exists check, then a write. This is NOT
  atomic: two racing writers may both succeed. Register a backend to do better.

The generation fence here is a storage-side backstop: the authoritative fence is
the sealed membership generation in etcd (invariant 3).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from elasticd.checkpoint.manifest import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointExists,
    CheckpointManifest,
    CorruptShard,
    ShardRecord,
    StaleGeneration,
    check_name,
    check_step,
    choose_checkpoint,
)

log = logging.getLogger(__name__)

READ_CHUNK = 8 * 2**20
"""Bytes read at a time when hashing a shard (keeps verification memory bounded)."""


WriteFn = Callable[[AbstractFileSystem, str, bytes], None]


@dataclass(frozen=True)
class StorageBackend:
    """How one kind of storage writes a file durably and creates one exclusively."""

    write: WriteFn
    """Write (or overwrite) a whole file."""
    create_exclusive: WriteFn
    """Create a file with these bytes; raise FileExistsError if it already exists."""
    atomic: bool
    """Whether ``create_exclusive`` is atomic against concurrent writers."""
    check: Callable[[], None] = lambda: None
    """Raise :class:`CheckpointError` if what is installed cannot keep these promises."""


def _write_temp(directory: str, data: bytes) -> str:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _local_write(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _local_create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, data)
    try:
        os.link(tmp, path)  # atomic, and fails with FileExistsError if path exists
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # No hard links on this filesystem: O_EXCL still decides the winner atomically.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.unlink(tmp)
    _fsync_dir(directory)


def _pipe(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    fs.pipe_file(path, data)


# The first s3fs whose one-shot "xb" write sends If-None-Match: *. Earlier releases send
# it on multipart uploads only, so the create of a small manifest was silently not
# exclusive. pyproject's floor cannot say so: a higher one sends pip's resolver astray.
S3FS_EXCLUSIVE_CREATE = (2025, 7)


def s3fs_exclusive_problem(version: str) -> str | None:
    """Why the s3fs of this ``version`` cannot commit checkpoints, or None."""
    try:
        year, month = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # not a calendar version: a development build, taken as new
    if (year, month) >= S3FS_EXCLUSIVE_CREATE:
        return None
    return (
        f"s3fs {version} does not create files exclusively on S3 (If-None-Match: *), so two "
        f"commits of one checkpoint could both win: pip install 's3fs>=2025.7'"
    )


def _check_s3fs() -> None:
    problem = s3fs_exclusive_problem(importlib.metadata.version("s3fs"))
    if problem:
        raise CheckpointError(problem)


def _s3_create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path, "xb") as f:  # s3fs: PutObject with If-None-Match: *
        f.write(data)


_memory_lock = threading.Lock()


def _memory_create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    with _memory_lock:
        if fs.exists(path):
            raise FileExistsError(path)
        fs.pipe_file(path, data)


def _generic_create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    if fs.exists(path):  # not atomic: a racing writer may create it in between
        raise FileExistsError(path)
    fs.pipe_file(path, data)


_GENERIC = StorageBackend(_pipe, _generic_create_exclusive, atomic=False)
_LOCAL = StorageBackend(_local_write, _local_create_exclusive, atomic=True)
_S3 = StorageBackend(_pipe, _s3_create_exclusive, atomic=True, check=_check_s3fs)
_MEMORY = StorageBackend(_pipe, _memory_create_exclusive, atomic=True)
_BACKENDS = {"file": _LOCAL, "local": _LOCAL, "s3": _S3, "s3a": _S3, "memory": _MEMORY}


def register_backend(protocol: str, backend: StorageBackend) -> None:
    """Make ``backend`` the way checkpoints are written for fsspec ``protocol``."""
    _BACKENDS[protocol] = backend


def backend_for(fs: AbstractFileSystem) -> StorageBackend:
    """The registered backend for ``fs``'s protocol, or the generic non-atomic one."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    for protocol in protocols:
        if protocol in _BACKENDS:
            return _BACKENDS[protocol]
    return _GENERIC


def _mismatch(record: ShardRecord, size: int, sha256: str) -> str | None:
    if (size, sha256) == (record.size, record.sha256):
        return None
    return f"{size} bytes sha256={sha256}, manifest says {record.size} bytes sha256={record.sha256}"


class CheckpointStore:
    """Sharded checkpoints of many jobs under one fsspec URL (or plain local path)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self._fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self._root = root.rstrip("/")
        self._backend = backend_for(self._fs)
        self._backend.check()
        if not self._backend.atomic:
            log.warning(
                "checkpoint store has no conditional create, commits not atomic url=%s", url
            )

    def _dir(self, job_id: str, step: int) -> str:
        return f"{self._root}/{check_name('job_id', job_id)}/{check_step('step', step):012d}"

    def write_shard(self, job_id: str, step: int, name: str, data: bytes) -> ShardRecord:
        """Store one shard of a not yet committed checkpoint and return its record."""
        check_name("name", name)
        directory = self._dir(job_id, step)
        data = bytes(data)
        # A fresh file name per write: a concurrent writer of the same step can
        # never overwrite bytes that a committed manifest points to.
        path = f"{name}.{secrets.token_hex(6)}.shard"
        # Hashed while the bytes are on their way (hashlib lets go of the GIL).
        with ThreadPoolExecutor(1, thread_name_prefix="shard-hash") as pool:
            digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
            if self._backend not in (_S3, _LOCAL):  # S3 has no directories; local makes its own
                self._fs.makedirs(directory, exist_ok=True)
            self._backend.write(self._fs, f"{directory}/{path}", data)
        log.debug("shard written job_id=%s step=%d shard=%s path=%s", job_id, step, name, path)
        return ShardRecord(name, path, digest.result(), len(data))

    def commit(self, manifest: CheckpointManifest) -> str:
        """Create the manifest, making the checkpoint exist; return its URL.

        Raises StaleGeneration (writing nothing) if a manifest of a higher
        generation is already committed for the job or a named shard is
        missing, CorruptShard if a shard's size is wrong, and CheckpointExists
        if this step is already committed.
        """
        directory = self._dir(manifest.job_id, manifest.step)
        ref = f"{manifest.job_id}@{manifest.step}"
        where = f"job_id={manifest.job_id} step={manifest.step} generation={manifest.generation}"
        committed = self.list_manifests(manifest.job_id)
        newest = max(committed, key=lambda m: (m.generation, m.step), default=None)
        if newest is not None and newest.generation > manifest.generation:
            log.warning("checkpoint commit refused %s reason=stale_generation", where)
            raise StaleGeneration(
                f"refusing to commit {ref} from generation "
                f"{manifest.generation}: generation {newest.generation} already committed "
                f"step {newest.step}"
            )
        self._fs.invalidate_cache(directory)
        for record in manifest.shards:
            try:
                info = self._fs.info(f"{directory}/{record.path}")
            except FileNotFoundError:
                log.warning("checkpoint commit refused %s reason=missing_shard", where)
                raise StaleGeneration(
                    f"refusing to commit {ref}: shard {record.name!r} ({record.path}) is missing"
                ) from None
            if info.get("size") != record.size:
                raise CorruptShard(
                    f"refusing to commit {ref}: shard "
                    f"{record.name!r} has {info.get('size')} bytes, manifest says {record.size}"
                )
        path = f"{directory}/{MANIFEST_NAME}"
        try:
            self._backend.create_exclusive(self._fs, path, manifest.to_json())
        except FileExistsError:
            log.warning("checkpoint commit refused %s reason=exists", where)
            raise CheckpointExists(f"checkpoint {ref} is already committed") from None
        url = self._fs.unstrip_protocol(path)
        log.info("checkpoint committed %s shards=%d url=%s", where, len(manifest.shards), url)
        return url

    def list_manifests(self, job_id: str) -> list[CheckpointManifest]:
        """Committed manifests of ``job_id``, oldest step first; unreadable ones are skipped."""
        job_dir = f"{self._root}/{check_name('job_id', job_id)}"
        self._fs.invalidate_cache(job_dir)
        try:
            entries = self._fs.ls(job_dir, detail=False)
        except FileNotFoundError:
            return []
        steps = sorted(
            int(base)
            for base in (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
            if len(base) == 12 and base.isdigit()
        )
        paths = [f"{job_dir}/{step:012d}/{MANIFEST_NAME}" for step in steps]
        # cat_ranges reads every manifest concurrently on async stores (s3) and,
        # unlike cat, never treats characters of the path as a glob pattern.
        contents = self._fs.cat_ranges(paths, None, None, on_error="return") if paths else []
        manifests = []
        for step, data in zip(steps, contents, strict=True):
            if isinstance(data, FileNotFoundError):
                continue  # shards written, manifest not (yet): no checkpoint here
            try:
                if isinstance(data, Exception):
                    raise data
                manifest = CheckpointManifest.from_json(data)
                if (manifest.job_id, manifest.step) != (job_id, step):
                    raise CheckpointError(
                        f"manifest is for {manifest.job_id}@{manifest.step}, "
                        f"stored as {job_id}@{step}"
                    )
            except (CheckpointError, OSError) as exc:
                log.warning(
                    "checkpoint manifest skipped job_id=%s step=%d error=%s", job_id, step, exc
                )
                continue
            manifests.append(manifest)
        return manifests

    def verify(self, manifest: CheckpointManifest) -> bool:
        """True if every shard of ``manifest`` exists with the recorded size and SHA-256."""
        directory = self._dir(manifest.job_id, manifest.step)
        for record in manifest.shards:
            digest, size = hashlib.sha256(), 0
            try:
                with self._fs.open(f"{directory}/{record.path}", "rb") as f:
                    while chunk := f.read(READ_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                problem = _mismatch(record, size, digest.hexdigest())
            except OSError as exc:
                problem = f"unreadable: {exc}"
            if problem is not None:
                log.warning(
                    "checkpoint shard failed verification job_id=%s step=%d shard=%s problem=%s",
                    manifest.job_id,
                    manifest.step,
                    record.name,
                    problem,
                )
                return False
        return True

    def latest(self, job_id: str) -> CheckpointManifest | None:
        """The newest checkpoint of ``job_id`` whose shards all verify, or None."""
        chosen = choose_checkpoint(self.list_manifests(job_id), self.verify)
        log.info("checkpoint chosen job_id=%s step=%s", job_id, chosen and chosen.step)
        return chosen

    def prune(
        self, job_id: str, keep: int, verified: CheckpointManifest | None = None
    ) -> list[int]:
        """Delete all but the ``keep`` newest checkpoints of ``job_id``; returns the steps deleted.

        The newest checkpoint that verifies is never deleted, even when newer
        ones exist. ``verified`` names it when the caller knows (one it just
        committed, whose shards its writers hashed), which saves reading every
        shard again. Each manifest goes first, so a checkpoint stops existing
        before any of its shards does.
        """
        manifests = self.list_manifests(job_id)
        newest_verified = verified or self.latest(job_id)
        kept = {m.step for m in manifests[-keep:]} if keep > 0 else {m.step for m in manifests}
        if newest_verified is not None:
            kept.add(newest_verified.step)
        deleted = []
        for m in manifests:
            if m.step in kept:
                continue
            directory = self._dir(job_id, m.step)
            self._fs.rm(f"{directory}/{MANIFEST_NAME}")
            self._fs.rm(directory, recursive=True)
            deleted.append(m.step)
        if deleted:
            log.info("checkpoints pruned job_id=%s steps=%s keep=%d", job_id, deleted, keep)
        return deleted

    def read_shard(self, manifest: CheckpointManifest, name: str) -> bytes:
        """The bytes of shard ``name``, checked against the manifest (CorruptShard if not)."""
        return self.read_record(manifest.job_id, manifest.step, manifest.shard(name))

    def read_record(self, job_id: str, step: int, record: ShardRecord) -> bytes:
        """The bytes of the shard ``record`` names in checkpoint ``job_id@step``, checked
        against it (CorruptShard if they differ or are missing)."""
        path = f"{self._dir(job_id, step)}/{record.path}"
        try:
            data = self._fs.cat_file(path)
        except FileNotFoundError:
            problem: str | None = f"missing ({path})"
        else:
            problem = _mismatch(record, len(data), hashlib.sha256(data).hexdigest())
        if problem is not None:
            raise CorruptShard(f"shard {record.name!r} of {job_id}@{step}: {problem}")
        return data

    def url_of(self, manifest: CheckpointManifest) -> str:
        """Full URL of ``manifest``'s MANIFEST.json."""
        return self._fs.unstrip_protocol(
            f"{self._dir(manifest.job_id, manifest.step)}/{MANIFEST_NAME}"
        )
