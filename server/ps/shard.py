"""One job's shard on one parameter server: tensors, a torch.optim optimizer,
a version counter and the generation fence.

Plain Python, no gRPC: the servicer validates requests and calls in here, and
tests drive it directly.

Two consistency models share the code:

- bounded staleness (``max_staleness`` < 0 or > 0): every push is applied at
  once, unless its gradient was computed on a version more than
  ``max_staleness`` versions old; that push is refused and the worker pulls
  again. elasticd refuses rather than delays a stale push: waiting cannot make
  a gradient fresher, it only grows older while it waits.
- synchronous (``max_staleness`` == 0): the shard collects one push per worker
  of the generation (``ShardConfig.workers``) for the current version, applies
  their mean in one optimizer step, and only then answers the pushers. The mean
  is summed in worker-id order, so the result does not depend on which push
  arrived first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from elasticd.optimizers import build_optimizer
from elasticd.server.ps.metrics import ShardStats
from elasticd.wire import CHUNK_BYTES, DTYPES, TensorHeader, as_bytes, chunk, encode_chunk_frame

log = logging.getLogger(__name__)


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


SPARE_GRADIENT_SETS = 2  # gradient buffers a shard keeps for reuse (each: the shard's size)
SYNC_ROUND_TIMEOUT_S = 30.0  # how long a synchronous push waits for the rest of its round
_WAIT_SLICE_S = 0.25  # how often a waiting pusher checks whether its caller went away


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


@dataclass
class SyncRound:
    """The gradients of one synchronous round: at most one push per worker, for one version."""

    version: int
    generation: int
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    outcome: PushResult | None = None
    aborted: str = ""


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
        self._changed = threading.Condition(self.lock)  # a synchronous round ended
        self._round: SyncRound | None = None
        self._spare_grads: list[list[torch.Tensor]] = []
        self._frames: tuple[tuple[int, int], list[bytes]] | None = None  # (version, size), frames
        self.stats = ShardStats()  # applied pushes and steps here; rejections by the servicer

    @property
    def pushes_applied(self) -> int:
        return self.stats.snapshot().pushes_applied

    @property
    def pushes_rejected(self) -> int:
        return sum(self.stats.snapshot().pushes_rejected.values())

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
            if self._round is not None:
                self._abort_round(
                    f"generation changed from {self._round.generation} to {generation} before "
                    f"the synchronous round for version {self._round.version} completed: "
                    "pull and push again"
                )

    def _abort_round(self, reason: str) -> None:
        """Release the waiters of the open synchronous round without applying it."""
        r, self._round = self._round, None
        r.aborted = reason  # each waiter raises it, and counts itself as rejected
        log.info(
            "event=sync_round_aborted job=%s version=%d pushes=%d reason=%r",
            self.config.job_id,
            r.version,
            len(r.grads),
            reason,
        )
        self._changed.notify_all()

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

    def pending_workers(self) -> list[str]:
        """Workers whose push waits in the open synchronous round."""
        with self.lock:
            return sorted(self._round.grads) if self._round else []

    @property
    def synchronous(self) -> bool:
        return self.config.max_staleness == 0

    def advance(self, generation: int, workers: int | None = None) -> None:
        with self.lock:
            self.fence(generation)
            if workers:
                self._resize(generation, workers)

    def _resize(self, generation: int, workers: int) -> None:
        """Size synchronous rounds by ``generation``'s workers, if it is the newest.

        Must be called with the lock held, after :meth:`fence` admitted ``generation``.
        """
        if generation != self.generation or workers <= 0 or workers == self.config.workers:
            return
        log.info(
            "event=round_size_changed job=%s generation=%d from=%d to=%d",
            self.config.job_id,
            generation,
            self.config.workers,
            workers,
        )
        self.config = ShardConfig(**{**self.config.__dict__, "workers": workers})
        r = self._round
        if r is not None and len(r.grads) >= workers:
            self._complete_round(r)

    def read(self, generation: int) -> tuple[int, list[torch.Tensor]]:
        """A consistent copy of the shard's parameters and their version."""
        with self.lock:
            self.fence(generation)
            return self.version, [p.detach().clone() for p in self.params]

    def gradient_buffers(self) -> list[torch.Tensor]:
        """Tensors to receive a dense push into; hand them back with :meth:`recycle`.

        Reused rather than allocated per push: a fresh buffer costs a page
        fault every 4 KiB on its first write, which made receiving a push
        several times slower than the copy itself.
        """
        with self.lock:
            if self._spare_grads:
                return self._spare_grads.pop()
        return empty_like_headers(self.headers)

    def recycle(self, buffers: list[torch.Tensor]) -> None:
        """Take back buffers from :meth:`gradient_buffers` once nothing refers to them."""
        with self.lock:
            if len(self._spare_grads) < SPARE_GRADIENT_SETS:
                self._spare_grads.append(buffers)

    def read_frames(self, generation: int, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, list]:
        """The shard's parameters as chunk frames (see elasticd.wire), and their version.

        Framed under the lock, straight from the parameters' memory: the one
        copy a pull makes on the server is also the consistent snapshot. The
        frames of the current version are kept (one more copy of the shard in
        memory), so workers pulling the same version, as every worker of a
        synchronous round does, share that copy.
        """
        with self.lock:
            self.fence(generation)
            key = (self.version, chunk_bytes)
            if self._frames is None or self._frames[0] != key:
                frames = [
                    encode_chunk_frame(index, offset, piece)
                    for index, p in enumerate(self.params)
                    for offset, piece in chunk(as_bytes(p.detach()), chunk_bytes)
                ]
                self._frames = (key, frames)
            return self.version, self._frames[1]

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

    def apply(
        self,
        generation: int,
        base_version: int,
        grads: list[torch.Tensor],
        worker_id: str = "",
        timeout: float = SYNC_ROUND_TIMEOUT_S,
        cancelled: Callable[[], bool] | None = None,
        workers: int = 0,
    ) -> PushResult:
        """Apply one pushed gradient (or, in synchronous mode, add it to the round).

        A synchronous push returns once its round is applied, and raises
        :class:`RoundAborted` if the round ends otherwise: the generation
        changed, ``timeout`` seconds passed, or ``cancelled()`` became true
        (the caller went away). An aborted push leaves nothing behind.
        ``workers`` is the size of the pusher's generation (0: unknown); the
        newest generation's size is the size of a synchronous round.
        """
        with self.lock:
            self.fence(generation)
            self._resize(generation, workers)
            limit = self.config.max_version
            if limit and self.version >= limit:
                return PushResult(self.version, False, self.version - base_version)
            staleness = check_staleness(self.version, base_version, self.config.max_staleness)
            if self.synchronous:
                return self._join_round(worker_id, grads, timeout, cancelled)
            self._step(grads)
            self.stats.applied(staleness)
            return PushResult(self.version, True, staleness)

    def _step(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        started = time.perf_counter()
        self.optimizer.step()
        self.stats.stepped(time.perf_counter() - started)
        for p in self.params:
            p.grad = None
        self.version += 1

    def _join_round(
        self,
        worker_id: str,
        grads: list[torch.Tensor],
        timeout: float,
        cancelled: Callable[[], bool] | None,
    ) -> PushResult:
        if not worker_id:
            raise BadRequest("a synchronous push must name its worker (worker_id is empty)")
        r = self._round
        if r is None:
            r = self._round = SyncRound(self.version, self.generation)
        if worker_id in r.grads:
            raise DuplicatePush(
                f"worker {worker_id!r} already pushed for version {r.version}; the round "
                f"waits for {self.config.workers - len(r.grads)} more worker(s)"
            )
        r.grads[worker_id] = grads
        if len(r.grads) >= self.config.workers:
            self._complete_round(r)
        deadline = time.monotonic() + timeout
        while r.outcome is None and not r.aborted:
            remaining = deadline - time.monotonic()
            gone = cancelled is not None and cancelled()
            if remaining <= 0 or gone:
                del r.grads[worker_id]
                if gone:
                    raise RoundAborted(f"push of worker {worker_id!r} cancelled by its caller")
                raise RoundAborted(
                    f"synchronous round for version {r.version} timed out after {timeout:g}s "
                    f"with {len(r.grads) + 1} of {self.config.workers} workers' gradients: "
                    "pull and push again"
                )
            self._changed.wait(min(remaining, _WAIT_SLICE_S))
        if r.aborted:
            raise RoundAborted(r.aborted)
        return r.outcome

    def _complete_round(self, r: SyncRound) -> None:
        self._step(mean_gradient(r.grads))
        for _ in r.grads:
            self.stats.applied(0)
        r.outcome = PushResult(self.version, True, 0)
        self._round = None
        log.debug(
            "event=sync_round_applied job=%s version=%d pushes=%d",
            self.config.job_id,
            self.version,
            len(r.grads),
        )
        self._changed.notify_all()


def empty_like_headers(headers: list[TensorHeader]) -> list[torch.Tensor]:
    return [torch.empty(h.shape, dtype=DTYPES[h.dtype]) for h in headers]
