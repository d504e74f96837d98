"""One job's shard on one parameter server: tensors, a torch.optim optimizer,
a version counter and the generation fence.

Plain Python, no gRPC: the servicer validates requests and calls in here, and
tests drive it directly.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from elasticd.checkpoint.serialize import encode_shard
from elasticd.optimizers import build_optimizer
from elasticd.wire import DTYPES, TensorHeader

log = logging.getLogger(__name__)


class ShardError(Exception):
    """Base of the errors a shard raises; each maps to one gRPC status."""


class StaleGeneration(ShardError):
    pass


class BadRequest(ShardError):
    pass


class StalePush(ShardError):
    pass


@dataclass(frozen=True)
class PushResult:
    version: int
    applied: bool
    staleness: int


@dataclass(frozen=True)
class ShardConfig:
    job_id: str
    optimizer: str
    optimizer_kwargs: dict
    max_staleness: int = -1  # < 0: unbounded
    workers: int = 1
    max_version: int = 0  # 0: no limit


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


class ParameterShard:
    def __init__(
        self,
        config: ShardConfig,
        generation: int,
        headers: list[TensorHeader],
        tensors: list[torch.Tensor],
    ) -> None:
        self.config = config
        self.generation = generation
        self.headers = headers
        self.params = [torch.nn.Parameter(t, requires_grad=True) for t in tensors]
        self.optimizer = build_optimizer(config.optimizer, config.optimizer_kwargs, self.params)
        self.version = 0
        self.lock = threading.Lock()
        self.pushes_applied = 0
        self.pushes_rejected = 0

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.headers)

    def fence(self, generation: int) -> None:
        """Admit ``generation`` if it is not older than the newest seen; raise otherwise.

        Must be called with the lock held.
        """
        self.check_fence(generation)
        if generation > self.generation:
            log.info(
                "event=generation_advanced job=%s from=%d to=%d",
                self.config.job_id,
                self.generation,
                generation,
            )
            self.generation = generation

    def check_fence(self, generation: int) -> None:
        """Raise if ``generation`` is stale, without admitting a newer one.

        Used before a request's payload is validated, so that a malformed
        request from a newer generation changes nothing.
        """
        if generation < self.generation:
            raise StaleGeneration(
                f"job {self.config.job_id}: generation {generation} is stale, "
                f"the job is at generation {self.generation}"
            )

    def advance(self, generation: int, workers: int | None = None) -> None:
        with self.lock:
            self.fence(generation)
            if workers:
                self.config = ShardConfig(**{**self.config.__dict__, "workers": workers})

    def read(self, generation: int) -> tuple[int, list[torch.Tensor]]:
        """A consistent copy of the shard's parameters and their version."""
        with self.lock:
            self.fence(generation)
            return self.version, [p.detach().clone() for p in self.params]

    def check_grad_headers(self, headers: list[TensorHeader]) -> None:
        if len(headers) != len(self.headers):
            raise BadRequest(
                f"push carries {len(headers)} tensors, the shard holds {len(self.headers)}"
            )
        for mine, theirs in zip(self.headers, headers, strict=True):
            if mine != theirs:
                raise BadRequest(
                    f"push tensor {theirs.key!r} {theirs.dtype}{list(theirs.shape)} does not match "
                    f"shard tensor {mine.key!r} {mine.dtype}{list(mine.shape)}"
                )

    def apply(self, generation: int, base_version: int, grads: list[torch.Tensor]) -> PushResult:
        with self.lock:
            self.fence(generation)
            limit = self.config.max_version
            if limit and self.version >= limit:
                return PushResult(self.version, False, self.version - base_version)
            try:
                staleness = check_staleness(self.version, base_version, self.config.max_staleness)
            except ShardError:
                self.pushes_rejected += 1
                raise
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            self.optimizer.step()
            for p in self.params:
                p.grad = None
            self.version += 1
            self.pushes_applied += 1
            return PushResult(self.version, True, staleness)

    def snapshot(self, generation: int) -> tuple[bytes, int]:
        """The shard's parameters and optimizer state, encoded; and its version."""
        with self.lock:
            self.fence(generation)
            tensors = {h.key: p.detach() for h, p in zip(self.headers, self.params, strict=True)}
            meta = {
                "job_id": self.config.job_id,
                "version": self.version,
                "generation": generation,
                "optimizer": self.config.optimizer,
                "keys": [h.key for h in self.headers],
            }
            # Encoded under the lock: the optimizer state must not move meanwhile.
            return encode_shard(tensors, self.optimizer.state_dict(), meta), self.version


def empty_like_headers(headers: list[TensorHeader]) -> list[torch.Tensor]:
    return [torch.empty(h.shape, dtype=DTYPES[h.dtype]) for h in headers]
