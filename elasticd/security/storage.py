"""Owned storage: which URLs the controller lets a job read and write with its credentials.

A job names storage in its spec (``checkpoint.url``, ``tensorboard``) and at
submit (``--resume-from``); the controller, its parameter servers and training
processes then read and write there with the cluster's credentials. The operator
lists the roots that may be named (``allowed_storage`` in the settings); a URL
must lie under one of them.

"Under" is decided on the parsed URL, never on the raw string:

- the protocols must be the same fsspec implementation (``s3`` and ``s3a`` are
  one, ``file`` and a plain path are one, ``memory`` is not ``s3``);
- the path is compared component by component, so ``s3://b/root-evil`` is not
  under ``s3://b/root``;
- a local path is taken as fsspec takes it (``file://etc`` is relative to the
  working directory) and then resolved by the operating system: ``..`` and
  symlinks, so ``file:///root/../etc`` and a link out of the root are outside;
- an object store path has no ``..`` of its own: it must lie under the root
  both with ``..`` resolved and read literally, key by key;
- chained URLs (``simplecache::s3://...``) are refused: they bring storage of
  their own.

The check is made when a URL enters (submit, a shard report, a restore); a
symlink made inside a root afterwards is not seen. Roots should be directories
only the cluster writes.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations, registry

LOCAL = "file"
SHOWN_CHARS = 200  # of a refused URL, in the error (a spec may hold a URL of a megabyte)


class StorageRefused(PermissionError):
    """A URL a caller named lies outside the storage the operator allows."""


def _implementation(protocol: str) -> str:
    """The fsspec implementation behind ``protocol``: aliases (s3a, gcs, local) compare equal."""
    # The names fsspec knows, before the classes imported so far: an imported class is spelled
    # by its own module (s3fs.core.S3FileSystem), the table by its package (s3fs.S3FileSystem),
    # and a protocol lands in the registry only once something opened it.
    known = known_implementations.get(protocol)
    if known is not None:
        return known["class"]
    imported = registry.get(protocol)
    if imported is None:
        return protocol
    return f"{imported.__module__}.{imported.__qualname__}"


_LOCAL_IMPLEMENTATION = _implementation(LOCAL)


@dataclass(frozen=True)
class StorageURL:
    """A URL as storage reads it: its implementation and its path, component by component."""

    implementation: str
    parts: tuple[str, ...]  # bucket or host first, for an object store
    literal: tuple[str, ...]  # the same, ``..`` not resolved (equal to parts for local paths)

    @classmethod
    def parse(cls, url: str) -> StorageURL:
        """Raises ValueError for what names no single storage location."""
        url = url.strip()
        if not url:
            raise ValueError("empty URL")
        if "::" in url:
            raise ValueError("a chained URL (::) is not a storage location")
        protocol, rest = fsspec.core.split_protocol(url)
        implementation = _implementation((protocol or LOCAL).lower())
        if implementation == _LOCAL_IMPLEMENTATION:
            # As fsspec reads it (relative to the working directory), then as the OS does.
            return cls.local_path(LocalFileSystem._strip_protocol(url))
        literal = tuple(p for p in rest.split("/") if p not in ("", "."))
        resolved = posixpath.normpath("/" + "/".join(literal))
        parts = tuple(p for p in resolved.split("/") if p)
        return cls(implementation, parts, literal)

    @classmethod
    def local_path(cls, path: str) -> StorageURL:
        """A local path (relative: to the working directory), ``..`` and symlinks resolved."""
        parts = tuple(p for p in os.path.realpath(path).split(os.sep) if p)
        return cls(_LOCAL_IMPLEMENTATION, parts, parts)

    def is_under(self, root: StorageURL) -> bool:
        n = len(root.parts)
        return (
            self.implementation == root.implementation
            and self.parts[:n] == root.parts
            and self.literal[:n] == root.parts
        )


def is_under(url: str, root: str) -> bool:
    """Whether storage URL ``url`` lies under ``root`` (see the module's rules)."""
    try:
        return StorageURL.parse(url).is_under(StorageURL.parse(root))
    except ValueError:
        return False


@dataclass(frozen=True)
class StoragePolicy:
    """The roots named URLs must lie under; ``roots is None``: any URL (an open cluster)."""

    roots: tuple[str, ...] | None = None

    @classmethod
    def open(cls) -> StoragePolicy:
        return cls(None)

    def refusal(self, field_name: str, url: str, local: bool = False) -> str | None:
        """Why ``url`` may not be named in ``field_name``, or None if it may.

        ``local``: the field is a local directory (``tensorboard``), whatever it looks like.
        """
        if self.roots is None or not url:
            return None
        try:
            where = StorageURL.local_path(url) if local else StorageURL.parse(url)
        except ValueError as exc:
            return f"{field_name}: {_shown(url)}: {exc}; allowed: {', '.join(self.roots)}"
        for root in self.roots:
            try:
                if where.is_under(StorageURL.parse(root)):
                    return None
            except ValueError:
                continue  # a malformed root allows nothing
        return (
            f"{field_name}: {_shown(url)} is not under an allowed storage root "
            f"(allowed: {', '.join(self.roots) or 'none'})"
        )

    def check(self, field_name: str, url: str, local: bool = False) -> None:
        """Raise StorageRefused naming the field unless ``url`` may be named there."""
        problem = self.refusal(field_name, url, local)
        if problem is not None:
            raise StorageRefused(problem)


def _shown(url: str) -> str:
    return repr(url) if len(url) <= SHOWN_CHARS else repr(url[:SHOWN_CHARS]) + "..."


def storage_policy(allowed: tuple[str, ...], users_checked: bool, own_root: str) -> StoragePolicy:
    """The controller's policy.

    ``allowed`` listed: those roots, and the controller's own checkpoint root
    (``--checkpoint-url``, where a job that names none writes). Nothing listed:
    a cluster that checks its users (a tokens file) allows its own checkpoint
    root only; an open cluster allows anything, as every caller is admin there.
    """
    if not allowed and not users_checked:
        return StoragePolicy.open()
    roots = tuple(allowed)
    if own_root and own_root not in roots:
        roots += (own_root,)
    return StoragePolicy(roots)
