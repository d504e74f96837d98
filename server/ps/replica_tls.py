"""Who is at each end of a replication channel, and that nobody else reads it.

When the cluster has TLS (the PS has a certificate), the replication channel
is a TLS connection made with the PS's own certificate and key and the
cluster's CA, as its gRPC port is, and a backup lets a primary in only once it
has shown that it is a parameter server of the cluster:

- under mutual TLS, by its client certificate: verified against the CA, and
  its common name must name a daemon that may act as a PS
  (:func:`elasticd.security.identities.daemon_kinds_of`);
- otherwise, by the cluster token: the backup sends a fresh random challenge
  inside the TLS stream and the primary answers with
  HMAC-SHA256(token, context || challenge). The token itself never travels;
- with neither (a cluster that checks no members), the one-time token is the
  only key, as it is for the gRPC service that hands it out.

The primary checks the backup's certificate against the CA and the backup's
host (or ``tls_server_name``), as a gRPC channel does. A plaintext peer never
gets past the handshake: whatever it sends is read as a broken TLS record and
the connection is closed before a byte of it is taken as a frame.

Without TLS the channel stays plaintext, as every port of such a cluster is;
the one-time token from ``OpenReplica`` (a members-only RPC) is then its only
key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import ssl
from dataclasses import dataclass

from elasticd.security.config import Security
from elasticd.security.identities import daemon_kinds_of

CHALLENGE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
_PROOF_CONTEXT = b"elasticd replica channel v1\0"  # a proof made here is good nowhere else


class PeerRefused(ConnectionError):
    """The peer is not a parameter server of this cluster (or could not show it)."""


def proof(token: str, challenge: bytes) -> bytes:
    """What a primary holding the cluster ``token`` answers to ``challenge``."""
    return hmac.new(token.encode(), _PROOF_CONTEXT + challenge, hashlib.sha256).digest()


def common_name(tls: ssl.SSLSocket) -> str:
    """The common name of the verified certificate the peer presented ("" if none)."""
    for rdn in (tls.getpeercert() or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


def _server_context(security: Security) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(security.tls_cert, security.tls_key)
    if security.tls_client_auth:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(security.tls_ca)
    return ctx


def _client_context(security: Security) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if security.tls_ca:
        ctx.load_verify_locations(security.tls_ca)
    else:
        ctx.load_default_certs()
    if security.tls_cert:
        ctx.load_cert_chain(security.tls_cert, security.tls_key)
    return ctx


@dataclass(frozen=True)
class ChannelSecurity:
    """How one PS guards the replication channels it serves and opens."""

    server: ssl.SSLContext | None  # None: the listener speaks plaintext
    client: ssl.SSLContext | None  # None: a primary connects in plaintext
    server_name: str  # checked in the backup's certificate instead of its host
    certificate: bool  # a primary shows a PS certificate (mutual TLS)
    token: str  # else the cluster token, by challenge and response ("": nothing to show)

    @classmethod
    def of(cls, security: Security) -> ChannelSecurity:
        return cls(
            server=_server_context(security) if security.tls_cert else None,
            client=_client_context(security) if security.tls else None,
            server_name=security.tls_server_name,
            certificate=security.tls_client_auth,
            token=security.cluster_token,
        )

    # -- the backup's end ------------------------------------------------

    def wrap_accepted(self, conn: socket.socket) -> socket.socket:
        """``conn`` as the listener serves it; the handshake waits for :meth:`admit`."""
        if self.server is None:
            return conn
        return self.server.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)

    def admit(self, conn: socket.socket) -> bytes | None:
        """Check who connected; the challenge to send, if its answer is to be checked.

        Raises PeerRefused (with the reason to answer) or OSError (a failed handshake).
        """
        if not isinstance(conn, ssl.SSLSocket):
            return None
        conn.do_handshake()
        if self.certificate:
            name = common_name(conn)
            if "ps" not in daemon_kinds_of(name):
                raise PeerRefused(
                    f"the certificate of {name or 'the peer'!r} does not name a parameter "
                    "server: only a PS may forward updates"
                )
        return secrets.token_bytes(CHALLENGE_BYTES)

    def check_proof(self, challenge: bytes | None, answer: bytes) -> None:
        """Refuse an answer to ``challenge`` that the cluster token does not give."""
        if challenge is None or self.certificate or not self.token:
            return
        if not hmac.compare_digest(proof(self.token, challenge), answer):
            raise PeerRefused("the peer did not show the cluster token")

    # -- the primary's end -------------------------------------------------

    def connect(self, sock: socket.socket, host: str) -> socket.socket:
        """``sock`` (connected to the backup at ``host``) after the TLS handshake."""
        if self.client is None:
            return sock
        return self.client.wrap_socket(sock, server_hostname=self.server_name or host)

    def answer(self, challenge: bytes) -> bytes:
        return proof(self.token, challenge) if self.token else bytes(PROOF_BYTES)
