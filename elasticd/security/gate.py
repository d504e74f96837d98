"""Who may call what: the server interceptor every elasticd server runs.

- Health checking and reflection are open (probes and tools need no token).
- The JobService takes users: their bearer token names an identity and a
  role (:mod:`elasticd.security.tokens`). ``read`` may look; ``submit`` may
  also submit, and cancel, switch, scale or checkpoint its own jobs; ``admin``
  may do anything. A cluster without a tokens file lets everyone in as admin.
- Every other service (PS, TrainingCoordinator, agent) takes only cluster
  members: a client certificate verified by mutual TLS, or the cluster token.
  A cluster with neither lets every caller in.

Refusals are UNAUTHENTICATED (no or unknown credentials) or PERMISSION_DENIED
(known, but not allowed), before the servicer runs: nothing changes.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import grpc

from elasticd.security.channels import AUTHORIZATION
from elasticd.security.config import Security
from elasticd.security.tokens import ANONYMOUS, Identity, TokenBook

log = logging.getLogger(__name__)

OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
USER_SERVICE = "elasticd.job.JobService"
# JobService methods and the least role that may call them; "own" methods also
# need the caller to own the job (or be admin). A method not listed is admin-only.
USER_METHODS = {
    "GetJob": ("read", False),
    "ListJobs": ("read", False),
    "WatchJob": ("read", False),
    "SubmitJob": ("submit", False),
    "CancelJob": ("submit", True),
    "CheckpointJob": ("submit", True),
    "SwitchMode": ("submit", True),
    "ScaleJob": ("submit", True),
}
IDENTITY_ATTRIBUTE = "elasticd_identity"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def caller_identity(context: grpc.ServicerContext) -> Identity:
    """The identity the gate let in for this call (anonymous admin without a gate)."""
    return getattr(context, IDENTITY_ATTRIBUTE, ANONYMOUS)


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


def _certificate_name(context: grpc.ServicerContext) -> str | None:
    auth = context.auth_context()
    names = auth.get("x509_common_name") or auth.get("x509_subject_alternative_name")
    return names[0].decode(errors="replace") if names else None


class Gate(grpc.ServerInterceptor):
    def __init__(
        self, security: Security, owner_of: Callable[[str], str | None] | None = None
    ) -> None:
        self.security = security
        self.tokens = TokenBook(security.tokens_file) if security.tokens_file else None
        self.owner_of = owner_of

    # -- decisions -----------------------------------------------------

    def member(self, context: grpc.ServicerContext) -> Identity:
        if self.security.tls_client_auth:
            name = _certificate_name(context)
            if name is not None:
                return Identity(f"member:{name}", "admin")
        token = self.security.cluster_token
        if token:
            offered = _bearer(context.invocation_metadata())
            if offered is not None and hmac.compare_digest(offered.encode(), token.encode()):
                return Identity("member", "admin")
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "internal service: cluster members only (present the cluster token or a "
                "client certificate)",
            )
        if self.security.tls_client_auth:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no verified client certificate")
        return ANONYMOUS

    def user(self, context: grpc.ServicerContext) -> Identity:
        if self.tokens is None:
            if self.security.tls_client_auth:
                name = _certificate_name(context)
                return Identity(name, "admin") if name else ANONYMOUS
            return ANONYMOUS
        offered = _bearer(context.invocation_metadata())
        if offered is None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "this cluster needs a token: pass --token-file or set ELASTICD_TOKEN",
            )
        identity = self.tokens.identify(offered)
        if identity is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        return identity

    def authorize(self, method: str, identity: Identity, request) -> None:
        role, own = USER_METHODS.get(method, ("admin", False))
        if not identity.may(role):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method}: {identity.name} has role {identity.role}; it needs {role}",
            )
        if own and identity.role != "admin" and self.owner_of is not None:
            job_id = getattr(request, "job_id", "")
            owner = self.owner_of(job_id)
            if owner is not None and owner != identity.name:
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method}: job {job_id} belongs to {owner or 'nobody'}, not to "
                    f"{identity.name} (only its owner or an admin may change it)",
                )

    # -- the interceptor -----------------------------------------------

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return handler

        def admit(request, context):
            try:
                if service == USER_SERVICE:
                    identity = self.user(context)
                    self.authorize(method, identity, request)
                else:
                    identity = self.member(context)
            except Refused as exc:
                log.info(
                    "event=call_refused method=%s code=%s peer=%s",
                    handler_call_details.method,
                    exc.code.name,
                    context.peer(),
                )
                context.abort(exc.code, str(exc))
            setattr(context, IDENTITY_ATTRIBUTE, identity)

        return _guarded(handler, admit)


def _guarded(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    """``handler`` with ``admit(request, context)`` run before its behavior.

    Streaming requests are admitted on their metadata alone (request None)."""
    if handler.unary_unary:

        def unary_unary(request, context):
            admit(request, context)
            return handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:

        def unary_stream(request, context):
            admit(request, context)  # before the stream starts, not at its first reply
            return handler.unary_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:

        def stream_unary(requests, context):
            admit(None, context)
            return handler.stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )

    def stream_stream(requests, context):
        admit(None, context)
        return handler.stream_stream(requests, context)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )
