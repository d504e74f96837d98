"""The controller's calls to the PS tier: one PS at a time, each outcome on its own.

:class:`elasticd.ps_client.PSTier` serves a training worker, which needs every
PS of its placement and fails as a whole. The controller must go on when some
PS is dead — fence the ones that answer, drop the shards that remain — so here
each PS is called separately and each answer or error is kept per PS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.rpc.limits import GRPC_OPTIONS
from elasticd.security.channels import open_channel

log = logging.getLogger(__name__)

T = TypeVar("T")

CONTROL_TIMEOUT_S = 5.0  # one control RPC (fence, drop, info) to one PS

# Answers that acknowledge a fence: the PS is at the generation or past it, or
# holds no shard (it then remembers the generation, so no older one creates one).
_FENCE_ACKS = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def call_each(
    addresses: Mapping[str, str], call: Callable[[ps_pb2_grpc.ParameterServerStub], T]
) -> dict[str, T | grpc.RpcError]:
    """``call(stub)`` on every PS in parallel; each PS's reply or its RpcError."""
    if not addresses:
        return {}

    def one(address: str) -> T | grpc.RpcError:
        with open_channel(address, options=GRPC_OPTIONS) as channel:
            try:
                return call(ps_pb2_grpc.ParameterServerStub(channel))
            except grpc.RpcError as exc:
                return exc

    with ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="ps-control") as pool:
        futures = {p: pool.submit(one, a) for p, a in sorted(addresses.items())}
        return {p: f.result() for p, f in futures.items()}


def advance_fence(
    job_id: str,
    generation: int,
    workers: int,
    addresses: Mapping[str, str],
    timeout: float = CONTROL_TIMEOUT_S,
) -> dict[str, str]:
    """Raise every PS's fence for ``job_id`` to ``generation``.

    Returns the PS that did not acknowledge, with the reason; empty when all did.
    """
    request = ps_pb2.AdvanceGenerationRequest(
        fence=ps_pb2.Fence(job_id=job_id, generation=generation), workers=max(workers, 0)
    )
    replies = call_each(addresses, lambda stub: stub.AdvanceGeneration(request, timeout=timeout))
    return {
        p: f"{r.code().name}: {r.details()}"
        for p, r in replies.items()
        if isinstance(r, grpc.RpcError) and r.code() not in _FENCE_ACKS
    }


def drop_shards(
    job_id: str, generation: int, addresses: Mapping[str, str], timeout: float = CONTROL_TIMEOUT_S
) -> dict[str, str]:
    """Drop ``job_id``'s shard on every PS that answers. Returns the PS that did not, with why."""
    request = ps_pb2.DropShardRequest(fence=ps_pb2.Fence(job_id=job_id, generation=generation))
    replies = call_each(addresses, lambda stub: stub.DropShard(request, timeout=timeout))
    return {
        p: f"{r.code().name}: {r.details()}"
        for p, r in replies.items()
        if isinstance(r, grpc.RpcError) and r.code() != grpc.StatusCode.NOT_FOUND
    }


def shard_infos(
    job_id: str, addresses: Mapping[str, str], timeout: float = CONTROL_TIMEOUT_S
) -> dict[str, ps_pb2.ShardInfoReply | grpc.RpcError]:
    request = ps_pb2.ShardInfoRequest(job_id=job_id)
    return call_each(addresses, lambda stub: stub.ShardInfo(request, timeout=timeout))
