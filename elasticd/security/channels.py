"""TLS credentials for servers and channels, and the bearer token a channel presents.

Two kinds of caller:

``member``
    A daemon or training process of the cluster calling an internal service
    (PS, TrainingCoordinator, agent). It proves membership with its client
    certificate (mutual TLS) or with the cluster token.
``user``
    A person or program calling the JobService with its own token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import grpc

from elasticd.security.config import Security, current

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
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or ()) + [self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def open_channel(
    address: str,
    security: Security | None = None,
    caller: Caller = "member",
    options: list[tuple[str, object]] | tuple = (),
) -> grpc.Channel:
    """A channel to ``address``: TLS when the settings name a CA or certificate, and
    the member's cluster token or the user's token on every call."""
    security = current() if security is None else security
    options = list(options)
    if security.tls:
        if security.tls_server_name:
            options.append(("grpc.ssl_target_name_override", security.tls_server_name))
        channel = grpc.secure_channel(address, channel_credentials(security), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = security.cluster_token if caller == "member" else security.token
    if not token:
        return channel
    return grpc.intercept_channel(channel, _Bearer(token))
