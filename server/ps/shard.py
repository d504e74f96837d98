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

With hot replicas (``ps.replicas: 2``) one copy of a group is the primary and
one the backup. The primary forwards every update it applies (the gradient
passed to the optimizer, its version and the pushes it came from) to the
backup before stepping itself, under its lock, so the backup applies the same
updates in the same order with the same arithmetic: the two stay equal bit
for bit. A push is acknowledged only once both applied it.

A push names its worker and the version its gradient was computed on. The
shard remembers, per worker, the last push it applied; the same push sent
again (the worker did not hear the answer: its PS died, or the generation
changed under it) is answered as applied and not applied twice.

A push also names its batch index (exactly-once data, ARCHITECTURE invariant
6). The shard keeps the set of batch indices it has applied, replicates it
with every update and writes it into every snapshot; a push of a batch in the
set is answered ``duplicate`` and applied nowhere. So a range of batches handed
again to another worker, after its first holder died half-way, is applied once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from elasticd.batches import BatchSet
from elasticd.optimizers import build_optimizer
from elasticd.server.ps.metrics import ShardStats
from elasticd.server.ps.rules import (  # noqa: F401  (re-exported: callers import them from here)
    NO_BATCH,
    BadRequest,
    Contributor,
    DuplicatePush,
    Forward,
    NotPrimary,
    PushResult,
    ReplicaUnavailable,
    RoundAborted,
    ShardConfig,
    ShardError,
    StaleGeneration,
    StalePush,
    SyncRound,
    check_staleness,
    mean_gradient,
)
from elasticd.server.ps.sync_round import SynchronousRounds
from elasticd.wire import CHUNK_BYTES, DTYPES, TensorHeader, as_bytes, chunk, encode_chunk_frame

log = logging.getLogger(__name__)


SPARE_GRADIENT_SETS = 2  # gradient buffers a shard keeps for reuse (each: the shard's size)
SYNC_ROUND_TIMEOUT_S = 30.0  # how long a synchronous push waits for the rest of its round


class ParameterShard(SynchronousRounds):
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
        self.backup = False  # a backup applies only what its primary forwards
        self.forward: Forward | None = None  # a primary's link to its backup
        self.backup_address = ""
        self.last_push: dict[str, int] = {}  # worker -> base version of its last applied push
        self.applied = BatchSet()  # batch indices whose gradients this shard has applied
        self._last_forwarded = -1  # a backup: the version the newest forwarded update applied to
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
        push_id: int = 0,
        batch: int = NO_BATCH,
    ) -> PushResult:
        """Apply one pushed gradient (or, in synchronous mode, add it to the round).

        A synchronous push returns once its round is applied, and raises
        :class:`RoundAborted` if the round ends otherwise: the generation
        changed, ``timeout`` seconds passed, or ``cancelled()`` became true
        (the caller went away). An aborted push leaves nothing behind.
        ``workers`` is the size of the pusher's generation (0: unknown); the
        newest generation's size is the size of a synchronous round. A push
        whose ``push_id`` is the worker's last applied one is acknowledged
        again and not applied twice. A push of a ``batch`` applied before is
        answered as a duplicate and not applied.
        """
        with self.lock:
            self.fence(generation)
            if self.backup:
                raise NotPrimary(
                    f"job {self.config.job_id}: this copy is a backup and takes updates only "
                    "from its primary: wait for the new placement"
                )
            self._resize(generation, workers)
            limit = self.config.max_version
            if limit and self.version >= limit:
                return PushResult(self.version, False, self.version - base_version)
            if push_id and worker_id and self.last_push.get(worker_id) == push_id:
                # Sent again by a worker that never heard the answer: applied once already.
                return PushResult(self.version, True, max(self.version - base_version - 1, 0))
            if batch != NO_BATCH and batch in self.applied:
                self.stats.rejected("duplicate_batch")
                return PushResult(self.version, False, 0, duplicate=True)
            staleness = check_staleness(self.version, base_version, self.config.max_staleness)
            if self.synchronous:
                return self._join_round(worker_id, push_id, batch, grads, timeout, cancelled)
            self._commit(grads, [(worker_id, push_id, batch)])
            self.stats.applied(staleness)
            return PushResult(self.version, True, staleness)

    def _commit(self, grads: list[torch.Tensor], contributors: list[Contributor]) -> None:
        """Apply one update: on the backup first (if any), then here. Lock held."""
        if self.forward is not None:
            self.forward(self.generation, self.version, grads, contributors)
        self._step(grads)
        for worker, push_id, batch in contributors:
            if worker and push_id:
                self.last_push[worker] = push_id
            if batch != NO_BATCH:
                self.applied.add(batch)

    def apply_replica(
        self,
        generation: int,
        version: int,
        grads: list[torch.Tensor],
        contributors: list[Contributor],
        accepted: Callable[[int], None] | None = None,
    ) -> int:
        """A backup applies one update its primary forwarded; returns its version after it.

        Updates apply in version order only. The same update sent twice (the
        primary did not hear the answer) is acknowledged once more and not
        applied again. ``accepted(version after)`` is called once the update is
        sure to apply, before the optimizer steps: the primary may step at the
        same time, since nothing reads this copy until its step is done (the lock
        is held throughout), and a backup that dies meanwhile is lost whole.
        """
        with self.lock:
            self.fence(generation)
            if not self.backup:
                raise NotPrimary(
                    f"job {self.config.job_id}: this copy is a primary; it takes no forwarded "
                    "updates"
                )
            if self.version == version + 1 and self._last_forwarded == version:
                if accepted is not None:
                    accepted(self.version)
                return self.version
            if self.version != version:
                raise BadRequest(
                    f"job {self.config.job_id}: the backup is at version {self.version}, the "
                    f"forwarded update applies to version {version}"
                )
            if accepted is not None:
                try:
                    accepted(version + 1)
                finally:
                    self._commit(grads, contributors)  # the primary may have heard the answer
                    self._last_forwarded = version
                for _ in contributors:
                    self.stats.applied(0)
                return self.version
            self._commit(grads, contributors)
            self._last_forwarded = version
            for _ in contributors:
                self.stats.applied(0)
            return self.version

    def configure(self, generation: int, backup: bool, forward: Forward | None, address: str):
        """Make this copy a backup, or a primary forwarding to ``address`` (a failover)."""
        with self.lock:
            self.fence(generation)
            self.backup = backup
            self.forward = None if backup else forward
            self.backup_address = "" if backup else address

    def _step(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        started = time.perf_counter()
        self.optimizer.step()
        self.stats.stepped(time.perf_counter() - started)
        for p in self.params:
            p.grad = None
        self.version += 1


def empty_like_headers(headers: list[TensorHeader]) -> list[torch.Tensor]:
    return [torch.empty(h.shape, dtype=DTYPES[h.dtype]) for h in headers]
