"""TLS credentials for servers and channels, and the bearer token a channel presents.

Two kinds of caller:

``member``
    A daemon or training process of the cluster calling an internal service
    (PS, TrainingCoordinator, agent). A daemon proves its kind with its client
    certificate (mutual TLS) or holds the cluster token; a training process
    presents its job credential (:func:`use_job_credential`).
``user``
    A person or program calling the JobService with its own token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import grpc

from elasticd.security.config import Security, SecurityError, current, is_loopback

AUTHORIZATION = "authorization"  # metadata key; value "Bearer <token>"

Caller = Literal["member", "user"]


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(security: Security) -> grpc.ServerCredentials | None:
    """None: serve plaintext."""
    if not security.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(_read(security.tls_key), _read(security.tls_cert))],
        root_certificates=_read(security.tls_ca) if security.tls_ca else None,
        require_client_auth=security.tls_client_auth,
    )


def channel_credentials(security: Security) -> grpc.ChannelCredentials:
    key = cert = None
    if security.tls_cert:
        key, cert = _read(security.tls_key), _read(security.tls_cert)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.tls_ca) if security.tls_ca else None,
        private_key=key,
        certificate_chain=cert,
    )


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel; ``token`` is
    read at each call (a training process's credential changes with its generation)."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def _with_token(self, details):
        token = self._token()
        if not token:
            return details
        metadata = list(details.metadata or ()) + [(AUTHORIZATION, f"Bearer {token}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


_job_credential = ""  # this training process's credential (see use_job_credential)


def use_job_credential(token: str) -> None:
    """Present ``token`` (a job credential) on every member call of this process from now
    on: a training process holds no cluster secret, only its job's credential."""
    global _job_credential
    _job_credential = token


def job_credential() -> str:
    return _job_credential


def host_of(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, or a gRPC target such as ``ipv4:h:p``."""
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        address = address.removeprefix(scheme)
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]")


def open_channel(
    address: str,
    security: Security | None = None,
    caller: Caller = "member",
    options: list[tuple[str, object]] | tuple = (),
) -> grpc.Channel:
    """A channel to ``address``: TLS when the settings name a CA or certificate, and
    on every call the member's cluster token (a training process: its job credential)
    or the user's token.

    A token is never sent in clear to an address other than loopback: that raises
    SecurityError unless the settings say ``insecure``.
    """
    security = current() if security is None else security
    if caller == "member" and (_job_credential or not security.cluster_token):
        token: Callable[[], str] = job_credential  # a training process, or an open cluster
    else:
        fixed = security.cluster_token if caller == "member" else security.token
        token = lambda: fixed  # noqa: E731
    if token() and not security.tls and not security.insecure and not is_loopback(host_of(address)):
        raise SecurityError(
            f"would send a token in clear to {address}: configure TLS (tls_ca), or set "
            "insecure to accept that on a trusted network"
        )
    options = list(options)
    if security.tls:
        if security.tls_server_name:
            options.append(("grpc.ssl_target_name_override", security.tls_server_name))
        channel = grpc.secure_channel(address, channel_credentials(security), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if caller == "user" and not token():
        return channel
    return grpc.intercept_channel(channel, _Bearer(token))
