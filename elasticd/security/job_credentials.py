"""Job credentials: what a training process presents instead of the cluster's secrets.

The controller mints one for each worker of each sealed generation and puts it
in that worker's node assignment; the agent hands each process only its own.
A credential names one job, one generation, one worker and its rank, and is an
HMAC over them with a key derived from the cluster's job secret (``job_secret``,
else the cluster token). Every daemon that holds the secret can check one
without asking anybody; no training process holds the secret.

What a credential allows is decided by :mod:`elasticd.security.policy`: calls
about its own job only, for its own generation or an older one (which every
server fences already), in its own worker's name; rendezvous publishing only
with rank 0. It is refused once the job is gone (its shards, its coordinator
state are dropped) and cannot speak for a newer generation, which has new
credentials. It is never written to storage or to a log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from elasticd.security.config import Security

PREFIX = "ej1."  # a job credential, version 1; anything else is not one
_DOMAIN = b"elasticd job credential v1"
MAX_LENGTH = 4096


@dataclass(frozen=True)
class JobCredential:
    job_id: str
    generation: int
    worker_id: str
    rank: int  # -1: a process kept out of the generation (a standby)


def signing_key(security: Security) -> bytes | None:
    """The key credentials are signed with; None: this cluster mints none (it is open)."""
    secret = security.job_secret or security.cluster_token
    if not secret:
        return None
    return hmac.new(secret.encode(), _DOMAIN, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(key: bytes, credential: JobCredential) -> str:
    body = json.dumps(
        [credential.job_id, credential.generation, credential.worker_id, credential.rank],
        separators=(",", ":"),
    ).encode()
    tag = hmac.new(key, body, hashlib.sha256).digest()
    return f"{PREFIX}{_b64(body)}.{_b64(tag)}"


def is_job_credential(token: str) -> bool:
    return token.startswith(PREFIX)


def verify(key: bytes, token: str) -> JobCredential | None:
    """The credential ``token`` carries, if ``key`` signed it; None otherwise."""
    if not token.startswith(PREFIX) or len(token) > MAX_LENGTH:
        return None
    body_text, _, tag_text = token[len(PREFIX) :].partition(".")
    try:
        body, tag = _unb64(body_text), _unb64(tag_text)
    except (ValueError, TypeError):
        return None
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag):
        return None
    try:
        job_id, generation, worker_id, rank = json.loads(body)
    except (ValueError, TypeError):
        return None
    if not (
        isinstance(job_id, str)
        and isinstance(worker_id, str)
        and type(generation) is int
        and type(rank) is int
    ):
        return None
    return JobCredential(job_id, generation, worker_id, rank)


class JobMinter:
    """Mints the credentials of a generation's workers (the controller's side)."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key

    @classmethod
    def of(cls, security: Security) -> JobMinter:
        return cls(signing_key(security))

    def __call__(self, job_id: str, generation: int, workers: dict[str, int]) -> dict[str, str]:
        """``{worker id: credential}`` for ``workers`` (worker id -> rank); {} when open."""
        if self._key is None:
            return {}
        return {
            w: mint(self._key, JobCredential(job_id, generation, w, rank))
            for w, rank in sorted(workers.items())
        }


NO_CREDENTIALS = JobMinter(None)  # an open cluster's: it mints none
