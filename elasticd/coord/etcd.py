"""The one module that talks to the etcd client library.

Everything else in elasticd goes through :class:`EtcdClient`, which speaks in
plain Python values (str keys, bytes values, revisions) and raises only the
errors defined here, so the client library can be swapped without touching
callers. Sessions, elections, generation sealing and watches are built on top
of this module, as etcd's own ``concurrency`` package builds on its client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import etcd3
import etcd3.etcdrpc as etcdrpc
import etcd3.exceptions
import etcd3.watch
import grpc

from elasticd.security.config import Security, current

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0  # per request; a dead endpoint fails over after this
# After a failure an endpoint is skipped this long before being tried again.
# The library's default (300 s) would turn a one-second etcd blink into minutes.
ENDPOINT_RETRY_S = 0.5


class EtcdError(Exception):
    """Base of errors raised by the etcd layer."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered in time. Callers retry with backoff."""


class EtcdRefused(EtcdError):
    """etcd answered but refused the credentials or the operation."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd has already compacted away."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted up to {compacted_revision}")
        self.compacted_revision = compacted_revision


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


# Transaction building blocks, independent of the client library.
@dataclass(frozen=True)
class Compare:
    key: str
    target: Literal["version", "mod", "create", "value"]
    op: Literal["==", "!=", "<", ">"]
    value: int | bytes


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


def parse_endpoints(spec: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"h1:2379,h2:2379"`` or a list of ``host:port`` → [(host, port)]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, int]] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        item = item.removeprefix("http://")
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {item!r} is not host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


def _translate(exc: BaseException) -> EtcdError:
    if isinstance(exc, EtcdError):
        return exc
    if isinstance(exc, etcd3.exceptions.RevisionCompactedError):
        return Compacted(exc.compacted_revision)
    return EtcdUnavailable(f"{type(exc).__name__}: {exc}")


_LIBRARY_ERRORS = (etcd3.exceptions.Etcd3Exception, grpc.RpcError, ValueError, AttributeError)


class EtcdClient:
    """A thread-safe etcd v3 client with fail-over between endpoints."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        timeout: float = DEFAULT_TIMEOUT_S,
        security: Security | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self.security = current() if security is None else security
        self._lock = threading.Lock()
        self._client = self._connect()

    def _credentials(self) -> grpc.ChannelCredentials | None:
        s = self.security
        if not s.etcd_tls:
            return None

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(s.etcd_ca), read(s.etcd_key), read(s.etcd_cert))

    def _connect(self) -> etcd3.MultiEndpointEtcd3Client:
        creds = self._credentials()
        eps = [
            etcd3.Endpoint(h, p, secure=creds is not None, creds=creds, time_retry=ENDPOINT_RETRY_S)
            for h, p in self.endpoints
        ]
        s = self.security
        try:
            return etcd3.MultiEndpointEtcd3Client(
                endpoints=eps,
                timeout=self.timeout,
                failover=True,
                user=s.etcd_user or None,
                password=s.etcd_password or None,
            )
        except _LIBRARY_ERRORS as exc:  # authenticating needs etcd
            raise self._explain(exc) from exc

    def _explain(self, exc: BaseException) -> EtcdError:
        if isinstance(exc, grpc.RpcError) and exc.code() in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            return EtcdRefused(
                f"etcd at {self.address} refused {self.security.etcd_user or 'this client'}: "
                f"{exc.details()} (check etcd_user, etcd_password and the user's role)"
            )
        return _translate(exc)

    @property
    def address(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _reauthenticate(self) -> None:
        """Get a fresh auth token: etcd's simple tokens expire (``--auth-token-ttl``)."""
        s = self.security
        request = etcdrpc.AuthenticateRequest(name=s.etcd_user, password=s.etcd_password)
        token = self._client.authstub.Authenticate(request, self.timeout).token
        self._client.metadata = (("token", token),)
        watcher = self._client._stubs.get("watcher")
        if watcher is not None:
            watcher._metadata = self._client.metadata
        log.info("event=etcd_reauthenticated user=%s", s.etcd_user)

    def _call(self, fn: Callable, *args, **kwargs):
        for attempt in (0, 1):
            try:
                return fn(*args, **kwargs)
            except grpc.RpcError as exc:
                expired = exc.code() == grpc.StatusCode.UNAUTHENTICATED
                if attempt == 0 and expired and self.security.etcd_user:
                    try:
                        self._reauthenticate()
                        continue
                    except _LIBRARY_ERRORS as again:
                        raise self._explain(again) from again
                raise self._explain(exc) from exc
            except _LIBRARY_ERRORS as exc:
                raise _translate(exc) from exc

    def _read(self, fn: Callable, *args, **kwargs):
        """A read, tried on each endpoint in turn: the library marks an endpoint that
        cannot be reached as failed but raises for that call. Writes are not retried
        here (a write may have landed before its connection broke)."""
        for _ in range(len(self.endpoints) - 1):
            try:
                return fn(*args, **kwargs)
            except etcd3.exceptions.ConnectionFailedError:
                continue
            except grpc.RpcError:
                break  # an answer, not an unreachable endpoint: _call explains or re-authenticates
            except _LIBRARY_ERRORS as exc:
                raise _translate(exc) from exc
        return self._call(fn, *args, **kwargs)

    # -- key/value -------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        value, meta = self._read(self._client.get, key)
        if value is None:
            return None
        return _kv(meta, value)

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` and the store revision they were read at."""
        resp = self._read(self._client.get_prefix_response, prefix)
        kvs = [
            KeyValue(kv.key.decode(), kv.value, kv.create_revision, kv.mod_revision, kv.lease)
            for kv in resp.kvs
        ]
        return kvs, resp.header.revision

    def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        self._call(self._client.put, key, value, lease=lease)

    def delete(self, key: str) -> bool:
        return bool(self._call(self._client.delete, key))

    def delete_prefix(self, prefix: str) -> None:
        self._call(self._client.delete_prefix, prefix)

    def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        """Put ``key`` only if it does not exist. True if this call created it."""
        ok, _ = self.transaction([Compare(key, "version", "==", 0)], [Put(key, value, lease)], [])
        return ok

    def transaction(
        self,
        compare: Iterable[Compare],
        success: Iterable[Put | Delete],
        failure: Iterable[Put | Delete] = (),
    ) -> tuple[bool, int]:
        """Run a transaction; returns (succeeded, revision after it)."""
        c = self._client
        txn = c.transactions

        def cmp(x: Compare):
            target = {
                "version": txn.version,
                "mod": txn.mod,
                "create": txn.create,
                "value": txn.value,
            }[x.target](x.key)
            return {
                "==": target.__eq__,
                "!=": target.__ne__,
                "<": target.__lt__,
                ">": target.__gt__,
            }[x.op](x.value)

        def op(x: Put | Delete):
            if isinstance(x, Put):
                return txn.put(x.key, x.value, lease=x.lease)
            if x.prefix:
                return txn.delete(x.key, range_end=etcd3.utils.prefix_range_end(x.key.encode()))
            return txn.delete(x.key)

        def run():
            # The library's transaction() drops the response header; build the
            # request ourselves to learn the revision the transaction produced.
            request = etcd3.etcdrpc.TxnRequest(
                compare=[cmp(x).build_message() for x in compare],
                success=c._ops_to_requests([op(x) for x in success]),
                failure=c._ops_to_requests([op(x) for x in failure]),
            )
            resp = c.kvstub.Txn(
                request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
            )
            return resp.succeeded, resp.header.revision

        return self._call(run)

    # -- leases ----------------------------------------------------------

    def grant_lease(self, ttl: int) -> int:
        return self._call(self._client.lease, ttl).id

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease once. Returns its remaining TTL; 0 means it is gone."""

        def run() -> int:
            ttl = 0
            for resp in self._client.refresh_lease(lease_id):
                ttl = resp.TTL
            return ttl

        return self._call(run)

    def revoke_lease(self, lease_id: int) -> None:
        try:
            self._call(self._client.revoke_lease, lease_id)
        except EtcdUnavailable:
            raise
        except EtcdError:
            pass

    # -- watches ---------------------------------------------------------

    def watch_prefix(
        self,
        prefix: str,
        start_revision: int,
        on_events: Callable[[list[WatchEvent], int], None],
        on_error: Callable[[EtcdError], None],
    ) -> Callable[[], None]:
        """Watch ``prefix`` from ``start_revision``; returns a cancel function.

        ``on_events(events, revision)`` runs on the library's watch thread.
        ``on_error`` is called once when the watch breaks (etcd unreachable or
        the revision compacted); the watch is dead afterwards.
        """
        dead = threading.Event()

        def callback(resp) -> None:
            if dead.is_set():
                return
            if isinstance(resp, BaseException):
                dead.set()
                on_error(_translate(resp))
                return
            events = []
            for ev in resp.events:
                kind = "delete" if isinstance(ev, etcd3.events.DeleteEvent) else "put"
                events.append(WatchEvent(kind, ev.key.decode(), ev.value, ev.mod_revision))
            on_events(events, resp.header.revision)

        watch_id = self._call(
            self._client.add_watch_prefix_callback,
            prefix,
            callback,
            start_revision=start_revision,
        )

        def cancel() -> None:
            dead.set()
            try:
                self._client.cancel_watch(watch_id)
            except _LIBRARY_ERRORS:
                pass

        return cancel

    def close(self) -> None:
        try:
            self._client.close()
        except _LIBRARY_ERRORS:
            pass


def _kv(meta, value: bytes) -> KeyValue:
    return KeyValue(
        meta.key.decode(), value, meta.create_revision, meta.mod_revision, meta.lease_id
    )
