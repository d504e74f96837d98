"""The callers elasticd tells apart, and how a certificate names each of them.

Every caller is one identity with one scope (ARCHITECTURE.md, invariant 11):

``controller``, ``ps``, ``agent``
    A daemon of the cluster. Under mutual TLS its certificate's common name says
    which kind (``elasticd-controller``, ``elasticd-ps``, ``elasticd-agent`` or
    ``elasticd-agent:<node>``); ``elasticd-node`` is a node's certificate that
    may act as any daemon kind. With the cluster token alone, a caller is a
    daemon of unknown kind (the token is the cluster's, held by daemons only).
``worker``
    A training process: one job, one generation, one worker id, proved by the
    job credential its agent handed it (:mod:`elasticd.security.job_credentials`).
    Under mutual TLS it presents the cluster's job certificate
    (``elasticd-job``) to get through the handshake; that certificate grants
    nothing by itself.
``user``
    A person or program calling the JobService: a token from the tokens file,
    or a certificate named ``user:<name>``. A user is never a daemon.
"""

from __future__ import annotations

DAEMON_KINDS = ("controller", "ps", "agent")
CERT_PREFIX = "elasticd-"
NODE_CERT = "elasticd-node"  # a daemon of any kind
JOB_CERT = "elasticd-job"  # a training process's handshake certificate: grants nothing
USER_CERT_PREFIX = "user:"


def daemon_cert_name(kind: str, node: str = "") -> str:
    """The common name of a daemon's certificate: ``elasticd-agent:n1``, ``elasticd-ps``."""
    if kind not in DAEMON_KINDS:
        raise ValueError(f"daemon kind: one of {', '.join(DAEMON_KINDS)}, got {kind!r}")
    return f"{CERT_PREFIX}{kind}" + (f":{node}" if node else "")


def user_cert_name(user: str) -> str:
    return f"{USER_CERT_PREFIX}{user}"


def daemon_kinds_of(common_name: str) -> tuple[str, ...]:
    """The daemon kinds a certificate with this common name may act as (none: not a daemon)."""
    if common_name == NODE_CERT:
        return DAEMON_KINDS
    kind = common_name.removeprefix(CERT_PREFIX).split(":", 1)[0]
    if common_name.startswith(CERT_PREFIX) and kind in DAEMON_KINDS:
        return (kind,)
    return ()


def user_of(common_name: str) -> str | None:
    """The user a certificate names, if it names one."""
    if common_name.startswith(USER_CERT_PREFIX) and len(common_name) > len(USER_CERT_PREFIX):
        return common_name[len(USER_CERT_PREFIX) :]
    return None
