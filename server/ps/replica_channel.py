"""The replication channel: a primary's updates reach its backup as raw bytes.

A hot replica doubles the bytes every push moves, so the second copy must be
cheap: gRPC in Python copies each chunk into a message and out again, a plain
TCP stream moves the same bytes for about a quarter of the CPU. The channel is
therefore one TCP connection per (job, group), opened like this:

1. the primary calls ``OpenReplica`` on the backup's gRPC service, which answers
   with the port of the backup's :class:`ReplicaListener` and a fresh token;
2. the primary connects and sends ``MAGIC`` and the token. A token is good for
   one connection, to that group only, within ``TOKEN_TTL_S``: whoever may not
   call the gRPC service cannot use the channel either. When the cluster has
   TLS, the connection is TLS and the backup first checks that the primary is a
   PS (:mod:`.replica_tls`): it answers the handshake with a reply (below)
   carrying a challenge, or refusing, and the primary's hello also carries its
   answer to the challenge;
3. each update is one frame: ``<IQ`` (header length, body length), a
   ``ReplicateHeader``, then the gradient of every tensor of the shard as raw
   bytes in the shard's order and dtypes (nothing to parse: the backup reads
   them straight into its gradient buffers);
4. the backup answers each frame with ``<BI`` (status, length) and a payload:
   status 0 and a ``ReplicateReply``, or a gRPC status code and its message.
   It answers 0 once the update is sure to apply, and then steps under the
   shard's lock, so the primary's step and the backup's run at the same time.

A frame the backup cannot take whole (a header that does not parse or names
another group, a body of the wrong size) is answered and the connection
closed, since the stream may no longer be in step; a refused update whose bytes
were all read (a stale generation, an out-of-order version) leaves it open.
Order and once-only application are the shard's (``apply_replica``), exactly
as for the gRPC ``Replicate`` stream, which stays for a backup that has no
channel.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

import grpc
import torch

from elasticd.rpc import ps_pb2
from elasticd.security.config import Security, current
from elasticd.server.ps.replica_tls import PROOF_BYTES, ChannelSecurity, PeerRefused
from elasticd.server.ps.rules import BadRequest, forwarded_contributors
from elasticd.server.ps.shard import ParameterShard, ShardError

log = logging.getLogger(__name__)

MAGIC = b"EDR1"
TOKEN_BYTES = 16
TOKEN_TTL_S = 30.0  # a token not used within this long is void
HELLO_TIMEOUT_S = 10.0  # a connection must present its token within this long
FRAME_TIMEOUT_S = 10.0  # each read of a frame under way, once its first bytes came
MAX_HEADER_BYTES = 1 << 16
MAX_TOKENS = 1024  # tokens outstanding at once; the oldest is dropped past this
HELLO_BYTES = len(MAGIC) + TOKEN_BYTES
_PREFIX = struct.Struct("<IQ")
_REPLY = struct.Struct("<BI")


_STATUS_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def status_name(code: int) -> str:
    """The name of the gRPC status code a reply carries."""
    return _STATUS_NAMES.get(code, f"status {code}")


class ChannelClosed(ConnectionError):
    """The peer closed the connection, or sent what the protocol does not allow."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ChannelClosed(f"connection closed after {got} of {len(view)} bytes")
        got += n


def tensor_view(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes, writable."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def send_reply(sock: socket.socket, code: int, payload: bytes) -> None:
    sock.sendall(_REPLY.pack(code, len(payload)) + payload)


class ReplicaListener:
    """A backup's end: accepts channels and applies the updates they carry.

    ``lookup(job_id, group)`` finds a shard; ``status_of(exc)`` maps a shard error
    to the gRPC status code the gRPC path would answer with. ``security`` (default:
    this process's) says whether the channel is TLS and whom it lets in.
    """

    def __init__(
        self,
        host: str,
        lookup: Callable[[str, str], ParameterShard | None],
        status_of: Callable[[Exception], grpc.StatusCode],
        security: Security | None = None,
    ) -> None:
        self._lookup, self._status_of = lookup, status_of
        self._security = ChannelSecurity.of(current() if security is None else security)
        self._tokens: dict[bytes, tuple[str, str, float]] = {}  # token -> job, group, expiry
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host.strip("[]"), 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="replica-accept", daemon=True).start()

    def issue(self, job_id: str, group: str) -> bytes:
        """A token for one connection carrying ``job_id``'s updates of ``group``."""
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        with self._lock:
            for t in [t for t, (_, _, exp) in self._tokens.items() if exp < now]:
                del self._tokens[t]
            while len(self._tokens) >= MAX_TOKENS:
                del self._tokens[next(iter(self._tokens))]
            self._tokens[token] = (job_id, group, now + TOKEN_TTL_S)
        return token

    def _redeem(self, token: bytes) -> tuple[str, str] | None:
        with self._lock:
            for known in list(self._tokens):
                if hmac.compare_digest(known, token):
                    job_id, group, expiry = self._tokens.pop(known)
                    return (job_id, group) if expiry >= time.monotonic() else None
        return None

    def close(self) -> None:
        self._closed = True
        _close(self._sock)  # shutdown first: that is what wakes a thread blocked in accept()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _close(c)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn = self._security.wrap_accepted(conn)  # the handshake is the thread's
            with self._lock:
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="replica-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        where = "-"
        try:
            peer = ":".join(str(part) for part in conn.getpeername()[:2])
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HELLO_TIMEOUT_S)
            try:
                challenge = self._security.admit(conn)
                if challenge is not None:
                    send_reply(conn, 0, challenge)
                hello = recv_exact(conn, HELLO_BYTES + (PROOF_BYTES if challenge else 0))
                self._security.check_proof(challenge, bytes(hello[HELLO_BYTES:]))
            except PeerRefused as exc:
                log.warning("event=replica_channel_refused peer=%s reason=%s", peer, exc)
                send_reply(conn, grpc.StatusCode.UNAUTHENTICATED.value[0], str(exc).encode())
                return
            bound = (
                self._redeem(bytes(hello[len(MAGIC) : HELLO_BYTES]))
                if hello[: len(MAGIC)] == MAGIC
                else None
            )
            if bound is None:
                send_reply(conn, grpc.StatusCode.UNAUTHENTICATED.value[0], b"unknown or used token")
                return
            where = f"{bound[0]}/{bound[1]}"
            while self._frame(conn, *bound):
                pass
        except (OSError, ChannelClosed) as exc:
            if not self._closed:
                log.info("event=replica_channel_closed group=%s reason=%s", where, exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close(conn)

    def _frame(self, conn: socket.socket, job_id: str, group: str) -> bool:
        """Serve one update; False when the connection is to be closed."""
        conn.settimeout(None)  # a primary may have nothing to forward for a long time
        first = conn.recv(1)
        if not first:
            return False  # the primary closed the channel
        conn.settimeout(FRAME_TIMEOUT_S)
        hlen, blen = _PREFIX.unpack(bytes(first) + bytes(recv_exact(conn, _PREFIX.size - 1)))

        def refuse(code: grpc.StatusCode, message: str) -> bool:
            send_reply(conn, code.value[0], message.encode())
            return False

        if hlen > MAX_HEADER_BYTES:
            return refuse(grpc.StatusCode.INVALID_ARGUMENT, f"header of {hlen} bytes")
        try:
            header = ps_pb2.ReplicateHeader.FromString(bytes(recv_exact(conn, hlen)))
        except Exception:  # protobuf's DecodeError, or anything a hostile header causes
            return refuse(grpc.StatusCode.INVALID_ARGUMENT, "the header does not parse")
        if (header.fence.job_id, header.fence.shard) != (job_id, group):
            return refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this channel carries job {job_id} group {group} only",
            )
        try:
            contributors = forwarded_contributors(header.workers, header.push_ids, header.batches)
        except BadRequest as exc:
            return refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        shard = self._lookup(job_id, group)
        if shard is None:
            return refuse(grpc.StatusCode.NOT_FOUND, f"no shard of job {job_id} group {group}")
        expected = sum(h.nbytes for h in shard.headers)
        if blen != expected:
            return refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"an update of this shard is {expected} bytes, not {blen}",
            )
        buffers = shard.gradient_buffers()
        try:
            for b in buffers:
                recv_into_exact(conn, tensor_view(b))
            shard.stats.received(blen)

            def accepted(version: int) -> None:  # answered before the backup's own step
                send_reply(conn, 0, ps_pb2.ReplicateReply(version=version).SerializeToString())

            try:
                shard.apply_replica(
                    header.fence.generation,
                    header.version,
                    buffers,
                    contributors,
                    accepted,
                )
            except ShardError as exc:
                send_reply(conn, self._status_of(exc).value[0], str(exc).encode())
                return True  # every byte of the frame was read: the stream is in step
        finally:
            shard.recycle(buffers)
        return True


class ReplicaChannel:
    """A primary's end of one channel (not thread-safe: the shard lock serialises calls)."""

    def __init__(
        self, host: str, port: int, token: bytes, timeout: float, security: ChannelSecurity
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.connect((host, port))
            self._sock = security.connect(self._sock, host)
            answer = b""
            if security.client is not None:  # a TLS backup checks who we are first
                code, challenge = self._reply()
                if code:
                    raise ChannelClosed(
                        f"the backup refused the channel ({status_name(code)}): "
                        f"{challenge.decode(errors='replace')}"
                    )
                answer = security.answer(challenge)
            self._sock.sendall(MAGIC + token + answer)
        except OSError:
            self._sock.close()
            raise

    def _reply(self) -> tuple[int, bytes]:
        code, n = _REPLY.unpack(bytes(recv_exact(self._sock, _REPLY.size)))
        return code, bytes(recv_exact(self._sock, n))

    def send(self, header: ps_pb2.ReplicateHeader, grads: list[torch.Tensor]) -> tuple[int, bytes]:
        """One update; the backup's (status code, payload). Raises OSError/ChannelClosed."""
        raw = header.SerializeToString()
        parts = [tensor_view(g.detach().contiguous()) for g in grads]
        self._sock.sendall(_PREFIX.pack(len(raw), sum(len(p) for p in parts)) + raw)
        for p in parts:
            self._sock.sendall(p)
        return self._reply()

    def close(self) -> None:
        _close(self._sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
