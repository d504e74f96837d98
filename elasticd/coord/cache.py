"""A local, always-current copy of one etcd prefix.

The pattern is list-then-watch: read the whole prefix and its revision, then
watch from the next revision. When the watch breaks — etcd unreachable, or the
revision compacted away — the cache lists again and watches from the new
revision, so no change is ever missed for long and none is applied twice.
Readers see a consistent dict and may wait for the next change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from elasticd.coord.etcd import EtcdClient, EtcdError, WatchEvent
from elasticd.retry import Backoff

log = logging.getLogger(__name__)


class PrefixCache:
    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._on_change = on_change
        self._items: dict[str, bytes] = {}
        self._mod: dict[str, int] = {}  # key -> mod revision of the value held
        self._revision = 0
        self._cond = threading.Condition()
        self._broken = threading.Event()
        self._stop = threading.Event()
        self._cancel: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self.relists = 0  # how often the cache had to list again after a broken watch

    def start(self) -> PrefixCache:
        self._thread = threading.Thread(target=self._run, name=f"cache{self.prefix}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._broken.set()
        if self._cancel is not None:
            self._cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def items(self) -> dict[str, bytes]:
        """Key (with the prefix removed) → value."""
        with self._cond:
            return dict(self._items)

    def entries(self) -> tuple[dict[str, tuple[bytes, int]], int]:
        """Key → (value, mod revision), and the revision the copy is current at."""
        with self._cond:
            return {k: (v, self._mod.get(k, 0)) for k, v in self._items.items()}, self._revision

    @property
    def revision(self) -> int:
        return self._revision

    def wait_for_change(self, after_revision: int, timeout: float) -> int:
        """Block until the cache has moved past ``after_revision`` or ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self._revision > after_revision, timeout=timeout)
            return self._revision

    def wait_for_revision(self, revision: int, timeout: float = 10.0) -> bool:
        """Block until the cache reflects every change up to ``revision``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._revision >= revision, timeout=timeout)

    def wait_synced(self, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._revision > 0, timeout=timeout)

    def _run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=2.0)
        while not self._stop.is_set():
            try:
                kvs, revision = self.client.get_prefix(self.prefix)
                n = len(self.prefix)
                with self._cond:
                    self._items = {kv.key[n:]: kv.value for kv in kvs}
                    self._mod = {kv.key[n:]: kv.mod_revision for kv in kvs}
                    self._revision = revision
                    self._cond.notify_all()
                self._notify()
                self._broken.clear()
                self._cancel = self.client.watch_prefix(
                    self.prefix, revision + 1, self._apply, self._on_error
                )
                backoff.reset()
                self._broken.wait()
                self._cancel()
                if not self._stop.is_set():
                    self.relists += 1
            except Exception as exc:
                # Never let the thread die: readers would sit on a cache that stopped.
                if isinstance(exc, EtcdError):
                    log.debug("event=cache_list_failed prefix=%s error=%s", self.prefix, exc)
                else:
                    log.exception("event=cache_error prefix=%s", self.prefix)
                self._stop.wait(backoff.next_delay())

    def _apply(self, events: list[WatchEvent], revision: int) -> None:
        n = len(self.prefix)
        with self._cond:
            for ev in events:
                if ev.kind == "put":
                    self._items[ev.key[n:]] = ev.value
                    self._mod[ev.key[n:]] = ev.mod_revision
                else:
                    self._items.pop(ev.key[n:], None)
                    self._mod.pop(ev.key[n:], None)
            self._revision = max(self._revision, revision)
            self._cond.notify_all()
        if events:
            self._notify()

    def _on_error(self, exc: EtcdError) -> None:
        log.info("event=watch_broken prefix=%s error=%s", self.prefix, exc)
        self._broken.set()

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("event=cache_callback_failed prefix=%s", self.prefix)
