"""A lease kept alive in the background, and the keys that live on it.

Liveness in elasticd is a lease (ARCHITECTURE invariant 2): an agent, a PS or a
controller holds one and registers its keys on it; when the process dies, the
keepalives stop and etcd deletes the keys after the TTL.

An etcd outage must not be mistaken for death. While etcd is unreachable the
session keeps retrying with backoff and the process keeps working; etcd keeps
leases across a restart (and extends them when a new leader is elected), so
after a short outage the same lease simply carries on. Only when etcd says the
lease is gone does the session grant a new one and register its keys again,
and the member then appears to the others as a new arrival.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from elasticd.coord.etcd import EtcdClient, EtcdError, EtcdUnavailable
from elasticd.retry import Backoff

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 5  # lease time to live; keepalives go out every ttl/3


class Session:
    def __init__(
        self,
        client: EtcdClient,
        ttl: int = DEFAULT_TTL_S,
        name: str = "",
        on_new_lease: Callable[[int], None] | None = None,
    ) -> None:
        if ttl < 2:
            raise ValueError("lease ttl must be at least 2 seconds")
        self.client = client
        self.ttl = ttl
        self.name = name
        self._on_new_lease = on_new_lease
        self._keys: dict[str, bytes] = {}
        self._dirty: set[str] = set()  # keys whose last put did not reach etcd
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lease_id: int | None = None
        self._thread: threading.Thread | None = None
        self.generation = 0  # how many leases this session has held
        # keepalives etcd answered, their summed and latest round-trip (read by the metrics)
        self.keepalives = 0
        self.keepalive_seconds = 0.0
        self.keepalive_last_s = 0.0

    @property
    def lease_id(self) -> int:
        if self._lease_id is None:
            raise RuntimeError("session not started")
        return self._lease_id

    def start(self, timeout: float = 30.0) -> Session:
        """Grant the first lease (retrying until ``timeout``) and start keepalives."""
        backoff = Backoff(initial=0.1, maximum=1.0, deadline=timeout)
        while True:
            try:
                self._new_lease()
                break
            except EtcdUnavailable as exc:
                if not backoff.sleep():
                    raise EtcdUnavailable(f"no lease from etcd within {timeout}s: {exc}") from exc
        self._thread = threading.Thread(
            target=self._keepalive_loop, name=f"session-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def alive(self) -> bool:
        """Whether the keepalive thread runs (whether or not etcd answers it)."""
        return self._thread is not None and self._thread.is_alive()

    def put(self, key: str, value: bytes) -> None:
        """Put ``key`` on the session's lease; it is put again on every new lease."""
        with self._lock:
            self._keys[key] = value
            lease = self._lease_id
        if lease is None:
            return
        try:
            self.client.put(key, value, lease=lease)
        except EtcdError:
            with self._lock:
                self._dirty.add(key)
            raise
        with self._lock:
            self._dirty.discard(key)

    def forget(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)
        self.client.delete(key)

    def close(self, revoke: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
        if revoke and self._lease_id is not None:
            try:
                self.client.revoke_lease(self._lease_id)
            except EtcdError as exc:
                log.info("event=lease_revoke_failed session=%s error=%s", self.name, exc)

    def _flush(self) -> None:
        """Put again the keys whose last put failed while etcd was unreachable."""
        with self._lock:
            pending = {k: self._keys[k] for k in self._dirty if k in self._keys}
            self._dirty.clear()
            lease = self._lease_id
        for key, value in pending.items():
            try:
                self.client.put(key, value, lease=lease)
            except EtcdError:
                with self._lock:
                    self._dirty.add(key)
                raise

    def _new_lease(self) -> None:
        lease = self.client.grant_lease(self.ttl)
        with self._lock:
            self._lease_id = lease
            keys = dict(self._keys)
            self.generation += 1
        for key, value in keys.items():
            self.client.put(key, value, lease=lease)
        with self._lock:
            self._dirty.clear()
        log.info("event=lease_granted session=%s lease=%x keys=%d", self.name, lease, len(keys))
        if self._on_new_lease is not None:
            self._on_new_lease(lease)

    def _keepalive_took(self, seconds: float) -> None:
        with self._lock:
            self.keepalives += 1
            self.keepalive_seconds += seconds
            self.keepalive_last_s = seconds

    def keepalive_figures(self) -> tuple[int, float, float]:
        """(keepalives answered, their summed seconds, the latest one's seconds)."""
        with self._lock:
            return self.keepalives, self.keepalive_seconds, self.keepalive_last_s

    def _keepalive_loop(self) -> None:
        interval = self.ttl / 3
        backoff = Backoff(initial=0.2, maximum=interval)
        outage = False
        while not self._stop.wait(interval if not outage else backoff.next_delay()):
            try:
                started = time.monotonic()
                remaining = self.client.keepalive(self.lease_id)
                self._keepalive_took(time.monotonic() - started)
                if remaining <= 0:
                    log.warning("event=lease_expired session=%s lease=%x", self.name, self.lease_id)
                    self._new_lease()
                self._flush()
                if outage:
                    log.info("event=etcd_reachable session=%s", self.name)
                outage = False
                backoff.reset()
            except Exception as exc:
                # Whatever failed, the thread must live on: a dead keepalive thread
                # is a lease that expires while its process believes it is alive.
                if not isinstance(exc, EtcdError):
                    log.exception("event=keepalive_error session=%s", self.name)
                elif not outage:
                    log.warning("event=etcd_unreachable session=%s error=%s", self.name, exc)
                outage = True
