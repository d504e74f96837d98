"""Who may call what: the server interceptor every elasticd server runs.

The gate works out who is calling (:meth:`Gate.identify`) and checks the call
against the one table of :mod:`elasticd.security.policy`:

- users call the JobService with a token from the tokens file (or, with no
  tokens file under mutual TLS, a certificate); ``read`` may look, ``submit``
  may also submit and change its own jobs, ``admin`` may do anything;
- daemons prove their kind with a certificate naming it, or hold the cluster
  token (then they may act as any kind);
- training processes present their job credential
  (:mod:`elasticd.security.job_credentials`): their own job, generation and
  worker only. Requests that are streams are checked on their first message.

A cluster with no tokens file, no cluster token and no mutual TLS checks nobody.
Refusals are UNAUTHENTICATED (no or unknown credentials) or PERMISSION_DENIED
(known, but not allowed), before the servicer runs: nothing changes.
"""

from __future__ import annotations

import hmac
import itertools
import logging
from collections.abc import Callable

import grpc

from elasticd.security import policy
from elasticd.security.channels import AUTHORIZATION
from elasticd.security.config import Security
from elasticd.security.identities import DAEMON_KINDS, JOB_CERT, daemon_kinds_of, user_of
from elasticd.security.job_credentials import is_job_credential, signing_key, verify
from elasticd.security.policy import OPEN_SERVICES, USER_SERVICE, Scope
from elasticd.security.tokens import ANONYMOUS, Identity, TokenBook

log = logging.getLogger(__name__)

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


def _denied(message: str) -> Refused:
    return Refused(grpc.StatusCode.PERMISSION_DENIED, message)


class Gate(grpc.ServerInterceptor):
    def __init__(
        self, security: Security, owner_of: Callable[[str], str | None] | None = None
    ) -> None:
        self.security = security
        self.tokens = TokenBook(security.tokens_file) if security.tokens_file else None
        self.owner_of = owner_of
        self.job_key = signing_key(security)
        # Nothing to check members with: internal services let every caller in (loopback
        # development); likewise the JobService without tokens or mutual TLS.
        self.members_open = not security.members_checked

    # -- who is calling ------------------------------------------------

    def identify(self, service: str, context: grpc.ServicerContext) -> Identity:
        offered = _bearer(context.invocation_metadata())
        name = _certificate_name(context) if self.security.tls_client_auth else None
        if service == USER_SERVICE:
            return self._user(offered, name)
        if offered is not None and is_job_credential(offered):
            credential = verify(self.job_key, offered) if self.job_key else None
            if credential is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid job credential")
            return Identity(
                f"worker {credential.worker_id} of job {credential.job_id}", "", job=credential
            )
        token = self.security.cluster_token
        if offered is not None and token:
            if hmac.compare_digest(offered.encode(), token.encode()):
                return Identity("member", "", daemon_kinds=DAEMON_KINDS)
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "internal service: cluster members only (present the cluster token or a "
                "client certificate)",
            )
        if name is not None and daemon_kinds_of(name):
            return Identity(name, "", daemon_kinds=daemon_kinds_of(name))
        if self.members_open:
            return ANONYMOUS
        if name is not None:
            raise _denied(f"internal service: certificate {name!r} names no elasticd daemon")
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "internal service: cluster members only (present the cluster token or a "
            "client certificate)"
            if self.security.cluster_token
            else "no verified client certificate",
        )

    def _user(self, offered: str | None, name: str | None) -> Identity:
        if self.tokens is not None:
            if offered is None:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this cluster needs a token: pass --token-file or set ELASTICD_TOKEN",
                )
            identity = self.tokens.identify(offered)
            if identity is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
            return identity
        if name is not None and name != JOB_CERT:
            # No tokens file: a certificate the cluster's CA signed names the user.
            return Identity(user_of(name) or name, "admin")
        if not self.security.tls_client_auth:
            return ANONYMOUS
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no verified client certificate")

    # -- may it -------------------------------------------------------

    def authorize(self, method: str, identity: Identity, request) -> None:
        """Raise Refused unless ``identity`` may call ``method`` with ``request``."""
        if identity.anonymous:
            return
        allowed = policy.callers(method)
        short = method.rpartition("/")[2]
        for caller in allowed:
            if caller in identity.daemon_kinds:
                return
        if identity.job is not None:
            job_callers = [c for c in allowed if c in policy.JOB_CALLERS]
            if job_callers:
                self._job_scope(short, identity, policy.scope_of(request), job_callers[0])
                return
        elif not identity.daemon_kinds:
            users = [c for c in allowed if c.startswith("user:")]
            if users:
                self._user_scope(short, identity, request, users[0].partition(":")[2])
                return
        raise _denied(f"{short}: {identity.name} may not call it (only {policy.describe(method)})")

    @staticmethod
    def _job_scope(method: str, identity: Identity, scope: Scope, caller: str) -> None:
        cred = identity.job
        assert cred is not None
        if scope.job_id != cred.job_id:
            raise _denied(
                f"{method}: the credential of job {cred.job_id} does not reach job "
                f"{scope.job_id or '(none named)'}"
            )
        if scope.generation is not None and scope.generation > cred.generation:
            raise _denied(
                f"{method}: generation {scope.generation} is newer than the credential's "
                f"({cred.generation})"
            )
        if scope.worker_id is not None and scope.worker_id != cred.worker_id:
            raise _denied(
                f"{method}: worker {cred.worker_id} cannot speak for worker {scope.worker_id}"
            )
        if caller == "rank0" and (cred.rank != 0 or scope.generation != cred.generation):
            raise _denied(
                f"{method}: only rank 0 of generation {scope.generation} may call it; "
                f"worker {cred.worker_id} holds rank {cred.rank} of generation {cred.generation}"
            )

    def _user_scope(self, method: str, identity: Identity, request, needed: str) -> None:
        role = "submit" if needed == "own" else needed
        if not identity.may(role):
            raise _denied(f"{method}: {identity.name} has role {identity.role}; it needs {role}")
        if needed == "own" and identity.role != "admin" and self.owner_of is not None:
            job_id = getattr(request, "job_id", "")
            owner = self.owner_of(job_id)
            if owner is not None and owner != identity.name:
                raise _denied(
                    f"{method}: job {job_id} belongs to {owner or 'nobody'}, not to "
                    f"{identity.name} (only its owner or an admin may change it)"
                )

    # -- the interceptor -----------------------------------------------

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        path = handler_call_details.method
        service = path.lstrip("/").partition("/")[0]
        if service in OPEN_SERVICES:
            return handler

        def admit(request, context, checked: bool = True) -> None:
            try:
                identity = caller_identity(context)
                if not hasattr(context, IDENTITY_ATTRIBUTE):
                    identity = self.identify(service, context)
                    setattr(context, IDENTITY_ATTRIBUTE, identity)
                if checked:
                    self.authorize(path, identity, request)
            except Refused as exc:
                log.info(
                    "event=call_refused method=%s code=%s peer=%s reason=%r",
                    path,
                    exc.code.name,
                    context.peer(),
                    str(exc),
                )
                context.abort(exc.code, str(exc))

        return _guarded(handler, admit)


def _guarded(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    """``handler`` with ``admit(request, context)`` run before its behavior.

    A stream of requests is admitted on its first message."""
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
            return handler.stream_unary(_first_admitted(requests, context, admit), context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )

    def stream_stream(requests, context):
        return handler.stream_stream(_first_admitted(requests, context, admit), context)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


def _first_admitted(requests, context, admit):
    """``requests`` once its first message is admitted (the caller first, then the message)."""
    admit(None, context, checked=False)  # unknown callers go before anything is read
    first = next(requests, None)
    admit(first, context)
    return requests if first is None else itertools.chain((first,), requests)
