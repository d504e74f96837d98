"""The JobService's bearer tokens: each a name (the identity) and a role.

The tokens file is YAML::

    tokens:
      - name: alice
        role: submit          # admin | submit | read
        sha256: 9f86d08...    # hex digest of the token (preferred: the file holds no secret)
      - name: ci
        role: read
        token: s3cr3t         # or the token itself

``admin`` may do anything; ``submit`` may submit jobs and cancel, switch,
scale or checkpoint its own; ``read`` may only look. The file is read again
when it changes, so tokens are added or revoked without a restart; a file
removed, unreadable or not valid revokes every token until it is valid again.
Only the controller (the JobService) reads it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml

from elasticd.security.config import SecurityError
from elasticd.security.job_credentials import JobCredential

log = logging.getLogger(__name__)

ROLES = ("read", "submit", "admin")  # each may do what the ones before it may


@dataclass(frozen=True)
class Identity:
    """Who called: a user (name and role), a daemon (``daemon_kinds``) or a training
    process (``job``: its job credential). See :mod:`elasticd.security.identities`."""

    name: str
    role: str
    daemon_kinds: tuple[str, ...] = ()  # the daemon kinds it may act as; () for others
    job: JobCredential | None = None  # a training process's credential
    anonymous: bool = False  # an open cluster checks nobody: it may call anything

    def may(self, role: str) -> bool:
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)


# A cluster that checks nobody lets everyone in, as everything.
ANONYMOUS = Identity("anonymous", "admin", anonymous=True)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, source: str) -> list[tuple[str, Identity]]:
    """[(sha256 hex of the token, identity)]; SecurityError naming every bad entry."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SecurityError(f"{source}: not YAML: {exc}") from exc
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise SecurityError(f"{source}: expected a mapping with a list under 'tokens'")
    out: list[tuple[str, Identity]] = []
    errors: list[str] = []
    for i, entry in enumerate(entries):
        where = f"tokens[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{where}: expected a mapping with name, role and token or sha256")
            continue
        name, role = entry.get("name"), entry.get("role")
        if not isinstance(name, str) or not name:
            errors.append(f"{where}.name: a non-empty string is required")
        if role not in ROLES:
            errors.append(f"{where}.role: one of {', '.join(ROLES)}, got {role!r}")
        token, sha = entry.get("token"), entry.get("sha256")
        if isinstance(token, str) and token and sha is None:
            sha = digest(token)
        elif not (isinstance(sha, str) and len(sha) == 64 and token is None):
            errors.append(f"{where}: give exactly one of token (a string) or sha256 (64 hex)")
            continue
        if isinstance(name, str) and name and role in ROLES:
            out.append((sha.lower(), Identity(name, role)))
    if len({sha for sha, _ in out}) != len(out):
        errors.append("two entries have the same token")
    if errors:
        raise SecurityError(f"{source}: " + "; ".join(errors))
    return out


class TokenBook:
    """Looks tokens up in the tokens file, reading it again when it changes.

    The file is the only source of truth: while it is missing, unreadable or not
    valid, no token is accepted (an operator who deletes or breaks it revokes
    everyone, as they would expect of a revocation list); once it is back and
    valid, its tokens are. It is first read at the first lookup, so a daemon
    that never serves users (a PS, an agent) never opens it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[tuple[str, Identity]] = []
        self._problem = ""  # why no token is accepted now ("" once the file is good)

    def _reload(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            entries = parse_tokens(Path(self.path).read_text(encoding="utf-8"), self.path)
        except (OSError, SecurityError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if problem != self._problem:
                log.warning(
                    "event=tokens_revoked path=%s reason=%s: no token is accepted until "
                    "the file is back and valid",
                    self.path,
                    problem,
                )
            self._entries, self._stamp, self._problem = [], None, problem
            return
        if self._problem or self._stamp is None:
            log.info("event=tokens_loaded path=%s tokens=%d", self.path, len(entries))
        self._entries, self._stamp, self._problem = entries, stamp, ""

    def identify(self, token: str) -> Identity | None:
        with self._lock:
            self._reload()
            entries = self._entries
        wanted = digest(token)
        found = None
        for sha, identity in entries:
            if hmac.compare_digest(sha, wanted):
                found = identity
        return found
