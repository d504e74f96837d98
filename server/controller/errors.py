"""Which failures the controller retries and which end a job.

A reconcile pass that fails must neither hide the failure nor end a job for
a reason that goes away by itself. Retryable: etcd or a PS not answering, a
conditional write that lost to a newer one, a fence not yet acknowledged,
leadership lost. Terminal: the job itself is broken — its task cannot be
built, its spec cannot be placed. Anything else is a bug in elasticd: it is
logged with its traceback and retried, and only after it has kept failing
for ``BUG_GIVE_UP_S`` does the job fail with the error in its message, so a
job is never silently stuck either.
"""

from __future__ import annotations

import grpc

from elasticd.checkpoint import CorruptShard
from elasticd.coord.election import NotLeading
from elasticd.coord.etcd import EtcdError
from elasticd.ps_errors import Fenced, PSUnavailable, ShardLost, StaleGradient
from elasticd.task import TaskError

BUG_GIVE_UP_S = 300.0  # an unexpected error that persists this long fails the job


class Conflict(Exception):
    """A conditional write lost: the job changed since the snapshot it was decided on."""


class FenceIncomplete(Exception):
    """A parameter server did not acknowledge a new generation's fence yet."""


RETRYABLE = (
    EtcdError,
    PSUnavailable,
    ShardLost,
    Fenced,
    StaleGradient,
    Conflict,
    FenceIncomplete,
    NotLeading,
    TimeoutError,
    ConnectionError,
    CorruptShard,  # changed since it verified: the next pass picks an older checkpoint
)
TERMINAL = (TaskError,)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.RpcError):
        return exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return isinstance(exc, RETRYABLE)


def is_terminal(exc: BaseException) -> bool:
    return isinstance(exc, TERMINAL)
