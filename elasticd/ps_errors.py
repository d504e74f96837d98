"""What a parameter server's refusals mean to its callers, as exceptions.

Each maps one gRPC status the PS answers with (see ``server/ps``) to what the
caller should do: wait for a new generation, try the PS again, pull again, or
wait for the controller to restore a lost shard.
"""

from __future__ import annotations

import grpc


class Fenced(Exception):
    """The PS has moved on to a newer generation than the caller's."""


class PSUnavailable(Exception):
    """A parameter server did not answer."""


class ShardLost(Exception):
    """A parameter server holds no shard of the job (it restarted, or the job ended
    there) and will not create one from the caller's parameters. Wait for the
    controller's next assignment."""


class StaleGradient(Exception):
    """The PS did not apply a gradient: it was computed on parameters too many
    versions old, or its synchronous round ended without it. Pull and push again."""


class DuplicatePush(StaleGradient):
    """The worker already pushed into the open synchronous round."""


def raise_for(exc: grpc.RpcError, ps_id: str):
    code = exc.code()
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        raise Fenced(f"{ps_id}: {exc.details()}") from None
    if code == grpc.StatusCode.ABORTED:
        raise StaleGradient(f"{ps_id}: {exc.details()}") from None
    if code == grpc.StatusCode.ALREADY_EXISTS:
        raise DuplicatePush(f"{ps_id}: {exc.details()}") from None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise PSUnavailable(f"{ps_id}: {exc.details()}") from None
    if code == grpc.StatusCode.NOT_FOUND:
        raise ShardLost(f"{ps_id}: {exc.details()}") from None
    raise exc
