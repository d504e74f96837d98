"""The rules a shard applies, as plain data and pure functions: its errors, its
configuration, what a push returns, and how a synchronous round and a stale
gradient are judged. :mod:`elasticd.server.ps.shard` applies them under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


class ShardError(Exception):
    """Base of the errors a shard raises; each maps to one gRPC status."""


class StaleGeneration(ShardError):
    pass


class BadRequest(ShardError):
    pass


class StalePush(ShardError):
    pass


class DuplicatePush(ShardError):
    """A worker pushed twice into one synchronous round."""


class RoundAborted(ShardError):
    """A synchronous round ended without applying this push (generation change, timeout)."""


class NotPrimary(ShardError):
    """A worker pushed to a backup copy, or a primary was sent a backup's update."""


class ReplicaUnavailable(ShardError):
    """The backup did not apply an update, so the primary did not either."""


# One push in an update: (worker id, push id, batch index); 0 and NO_BATCH for none.
Contributor = tuple[str, int, int]
NO_BATCH = -1

# forward(generation, version, grads, contributors): apply one update on the backup,
# or raise ReplicaUnavailable.
Forward = Callable[[int, int, list[torch.Tensor], list[Contributor]], None]


def forwarded_contributors(
    workers: Sequence[str], push_ids: Sequence[int], batches: Sequence[int]
) -> list[Contributor]:
    """The pushes of a forwarded update, from a ReplicateHeader's parallel lists.

    ``batches`` may be empty (a primary that names no batches); otherwise every
    list has one entry per push, and a batch is an index >= 0 or NO_BATCH.
    """
    if len(workers) != len(push_ids) or (batches and len(batches) != len(workers)):
        raise BadRequest(
            f"a forwarded update lists {len(workers)} workers, {len(push_ids)} push ids "
            f"and {len(batches)} batches: they must be equal in length"
        )
    if any(b < NO_BATCH for b in batches):
        raise BadRequest(f"batch indices must be >= 0 (or {NO_BATCH}: none)")
    named = list(batches) or [NO_BATCH] * len(workers)
    return list(zip(workers, push_ids, named, strict=True))


@dataclass(frozen=True)
class PushResult:
    version: int
    applied: bool
    staleness: int
    duplicate: bool = False  # its batch was applied before: nothing was applied now


@dataclass(frozen=True)
class ShardConfig:
    job_id: str
    optimizer: str
    optimizer_kwargs: dict
    max_staleness: int = -1  # < 0: unbounded
    workers: int = 1
    max_version: int = 0  # 0: no limit


@dataclass
class SyncRound:
    """The gradients of one synchronous round: at most one push per worker, for one version."""

    version: int
    generation: int
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    push_ids: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    outcome: PushResult | None = None
    aborted: str = ""
    error: type[ShardError] = RoundAborted  # what the waiters of an aborted round raise


def mean_gradient(contributions: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    """The element-wise mean of the workers' gradients, summed in worker-id order."""
    workers = sorted(contributions)
    total = [g.clone() for g in contributions[workers[0]]]
    for w in workers[1:]:
        for t, g in zip(total, contributions[w], strict=True):
            t.add_(g)
    for t in total:
        t.div_(len(workers))
    return total


def check_staleness(version: int, base_version: int, max_staleness: int) -> int:
    """Staleness of a gradient computed at ``base_version``; raises past the bound."""
    if base_version > version or base_version < 0:
        raise BadRequest(
            f"base_version {base_version} is not a version this shard had (now {version})"
        )
    staleness = version - base_version
    if 0 <= max_staleness < staleness:
        raise StalePush(
            f"gradient computed on version {base_version} is {staleness} versions old; "
            f"the job allows {max_staleness}: pull and push again"
        )
    return staleness
