"""Leader election on etcd, as etcd's concurrency.Election does it.

Each candidate puts a key under the election prefix on its session's lease.
The candidate whose key has the lowest create revision leads; the others wait.
When the leader dies its lease expires, its key vanishes and the next oldest
candidate leads. Leadership is lost the moment the candidate's own key is gone
(its lease expired during an etcd outage or partition), and the holder must
stop acting as leader then.

A candidate's key is named once, when it is created, not after its lease:
the session puts its keys again under a new lease after the old one
expired (a process stopped past its TTL), and that key must still be the
candidate's own. Named after the first lease, it was not, and a lone
controller stood against its own old key and never led again.
"""

from __future__ import annotations

import logging
import secrets
import threading

from elasticd.coord.cache import PrefixCache
from elasticd.coord.etcd import Compare, EtcdClient, EtcdError
from elasticd.coord.session import Session

log = logging.getLogger(__name__)


def leader_of(candidates: dict[str, tuple[int, bytes]]) -> tuple[str, bytes] | None:
    """(key, value) of the candidate with the lowest create revision."""
    if not candidates:
        return None
    key = min(candidates, key=lambda k: candidates[k][0])
    return key, candidates[key][1]


class NotLeading(RuntimeError):
    """A write that needs leadership, from a candidate that does not lead."""


class Election:
    def __init__(self, session: Session, prefix: str, value: bytes) -> None:
        self._leading_rev = 0  # create revision of our key when last confirmed leader
        self.session = session
        self.client: EtcdClient = session.client
        self.prefix = prefix.rstrip("/") + "/"
        self.value = value
        self._name = secrets.token_hex(8)  # this candidate, across leases
        self._changed = threading.Event()
        self._cache = PrefixCache(self.client, self.prefix, on_change=self._changed.set)

    @property
    def my_key(self) -> str:
        return f"{self.prefix}{self._name}"

    def start(self) -> Election:
        self.session.put(self.my_key, self.value)
        self._cache.start()
        return self

    def candidates(self) -> dict[str, tuple[int, bytes]]:
        kvs, _ = self.client.get_prefix(self.prefix)
        return {kv.key: (kv.create_revision, kv.value) for kv in kvs}

    def is_leader(self) -> bool:
        """Ask etcd (not the cache) whether this candidate leads right now.

        Never raises: an etcd error counts as "not leader" for this pass.
        """
        try:
            candidates = self.candidates()
            lead = leader_of(candidates)
            if lead is None or lead[0] != self.my_key:
                self._leading_rev = 0
                if self.my_key not in candidates:
                    # Our key went with an expired lease: stand again.
                    self.session.put(self.my_key, self.value)
                return False
        except EtcdError as exc:
            log.info("event=leadership_unknown error=%s", exc)
            self._leading_rev = 0
            return False
        self._leading_rev = candidates[self.my_key][0]
        return True

    def guard(self) -> list[Compare]:
        """Compares that hold only while this candidate still leads, for a transaction.

        As etcd's own election does: the leader's key still exists with the
        create revision it had when it won. A newer candidate can never have a
        lower one, so the key unchanged means no one else leads. Raises
        NotLeading if this candidate has not been confirmed leader.
        """
        rev = self._leading_rev
        if not rev:
            raise NotLeading("this controller is not the leader")
        return [Compare(self.my_key, "create", "==", rev)]

    def wait_for_change(self, timeout: float) -> None:
        self._changed.wait(timeout)
        self._changed.clear()

    def leader_value(self) -> bytes | None:
        items = self._cache.items()
        if not items:
            return None
        # The cache has no revisions; ask etcd for the authoritative answer.
        try:
            lead = leader_of(self.candidates())
        except EtcdError:
            return None
        return None if lead is None else lead[1]

    def resign(self) -> None:
        self._cache.stop()
        try:
            self.session.forget(self.my_key)
        except EtcdError as exc:
            log.info("event=resign_failed error=%s", exc)


def observe_leader(client: EtcdClient, prefix: str) -> bytes | None:
    """The value the current leader published, or None if nobody leads."""
    kvs, _ = client.get_prefix(prefix.rstrip("/") + "/")
    lead = leader_of({kv.key: (kv.create_revision, kv.value) for kv in kvs})
    return None if lead is None else lead[1]
