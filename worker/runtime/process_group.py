"""One torch.distributed process group per generation, formed again after every change.

The controller seals a generation (who trains, in which rank); this module
turns that into a process group, and turns a broken one into a new one,
without restarting the process (its replica stays in memory).

Rendezvous for generation ``n`` (ranks and world size from the assignment):

1. Rank 0 starts a ``TCPStore`` (``is_master``, port 0) and publishes
   ``host:port`` in the :class:`~.rendezvous.RendezvousDirectory`; the other
   ranks look it up with backoff and connect.
2. The store is shared by every *round* of the generation. A round is one
   attempt to form the group: rank 0 opens round ``k`` (``add("round", 1)``),
   the others wait until the round counter passes the last round they used.
   Each participant then counts itself in (``add("r<k>/arrived", 1)``) and
   all wait until ``world_size`` have arrived. A count beyond ``world_size``
   means the round was already formed without us (we are a restarted
   process, the others are still stuck in it): we wait for the next round,
   which rank 0 opens as soon as its broken collective fails.
3. ``init_process_group(backend, store=PrefixStore(f"gen{n}/r{k}", store), ...)``
   with an explicit collective timeout, so a collective waiting on a dead or
   hung peer fails instead of hanging.

Rounds exist because a worker that crashes is restarted by its agent *in the
same generation*: the survivors' collectives fail, and the group must be
formed again with the same ranks. A newer generation (from the agent's
control pipe) ends any wait at once. Every wait is bounded by the reform
timeout, after which the process exits and its agent takes over.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time

import torch
import torch.distributed as dist

from elasticd.retry import Backoff
from elasticd.worker.runtime import heartbeat
from elasticd.worker.runtime.control import Assignment, AssignmentFeed, GroupAbandoned
from elasticd.worker.runtime.rendezvous import (
    DirectoryUnavailable,
    RendezvousDirectory,
    StaleRendezvous,
    advertise_host,
)

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 30.0  # a collective stuck on a dead or hung peer fails after this
REFORM_TIMEOUT_S = 300.0  # longest wait for a group to form before the process gives up
STORE_CONNECT_TIMEOUT_S = 5.0  # connecting to a published store; a dead one costs this much


class CollectiveFailed(RuntimeError):
    """A collective, or forming the group, failed: a peer died, hung, or left."""


class LeftOut(Exception):
    """The newest generation does not list this process: there is no group to form."""

    def __init__(self, generation: int) -> None:
        super().__init__(f"generation {generation} leaves this process out")
        self.generation = generation


def pick_backend(local_rank: int) -> tuple[str, torch.device]:
    """nccl on ``cuda:<local_rank>`` when CUDA is available, else gloo on the CPU."""
    if torch.cuda.is_available():
        # Abort NCCL communicators on a timeout but keep the process: the error
        # then reaches Work.wait() and the group is formed again. torch's
        # default (3) tears the process down instead.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return "nccl", device
    return "gloo", torch.device("cpu")


class ElasticGroup:
    """The process group of the current generation, and how to form the next one."""

    def __init__(
        self,
        directory: RendezvousDirectory,
        backend: str = "gloo",
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
        reform_timeout_s: float = REFORM_TIMEOUT_S,
        connect_timeout_s: float = STORE_CONNECT_TIMEOUT_S,
    ) -> None:
        self.directory = directory
        self.backend = backend
        self.collective_timeout = datetime.timedelta(seconds=collective_timeout_s)
        self.reform_timeout_s = reform_timeout_s
        self.connect_timeout = datetime.timedelta(seconds=connect_timeout_s)
        self.generation = 0
        self.round = 0
        self.rank = 0
        self.world_size = 0
        self.formed = False
        self._store: dist.Store | None = None
        self._store_generation = 0
        self._store_address = ""
        self._hosting = False
        self._published_to = ""  # controller the hosted store's address was published to
        self._last_round = 0

    # -- forming ---------------------------------------------------------------

    def form(self, feed: AssignmentFeed, after_generation: int = 0) -> None:
        """Form the group of the newest assignment whose generation is > ``after_generation``.

        Returns once ``init_process_group`` succeeded; raises LeftOut when that
        assignment does not list this process, GroupAbandoned when the control
        pipe closes or nothing works out within the reform timeout.
        """
        self.destroy()
        deadline = time.monotonic() + self.reform_timeout_s
        backoff = Backoff(initial=0.02, maximum=0.5)
        while True:
            heartbeat.beat()
            if feed.closed:
                raise GroupAbandoned("control pipe closed: the agent is gone")
            if time.monotonic() > deadline:
                raise GroupAbandoned(
                    f"no group formed within {self.reform_timeout_s:.0f}s "
                    f"(generation {feed.current.generation}, waiting for one after "
                    f"{after_generation})"
                )
            feed.refresh()
            a = feed.current
            if a.generation <= after_generation:
                backoff.sleep()
                continue
            if not a.member:
                raise LeftOut(a.generation)
            try:
                store = self._store_for(a)
                k = self._join_round(store, a, feed, deadline) if store is not None else None
            except StaleRendezvous as exc:
                log.info(
                    "event=rendezvous_stale job=%s generation=%d worker=%s detail=%s",
                    a.job_id,
                    a.generation,
                    a.worker_id,
                    exc,
                )
                after_generation = max(after_generation, a.generation)
                continue
            except RuntimeError as exc:  # the store went away (its host died)
                log.info(
                    "event=rendezvous_store_lost job=%s generation=%d worker=%s error=%s",
                    a.job_id,
                    a.generation,
                    a.worker_id,
                    _first_line(exc),
                )
                self._drop_store()
                continue
            if k is None:
                backoff.sleep()
                continue
            backoff.reset()
            if self._init(store, a, k):
                return

    def _init(self, store: dist.Store, a: Assignment, k: int) -> bool:
        self._last_round = k
        try:
            dist.init_process_group(
                self.backend,
                store=dist.PrefixStore(f"gen{a.generation}/r{k}", store),
                rank=a.rank,
                world_size=a.world_size,
                timeout=self.collective_timeout,
            )
        except RuntimeError as exc:
            log.warning(
                "event=group_init_failed job=%s generation=%d round=%d worker=%s error=%s",
                a.job_id,
                a.generation,
                k,
                a.worker_id,
                _first_line(exc),
            )
            self.destroy()
            return False
        self.generation, self.round = a.generation, k
        self.rank, self.world_size = a.rank, a.world_size
        self.formed = True
        log.info(
            "event=group_formed job=%s generation=%d round=%d worker=%s rank=%d world=%d "
            "backend=%s store=%s",
            a.job_id,
            a.generation,
            k,
            a.worker_id,
            a.rank,
            a.world_size,
            self.backend,
            self._store_address,
        )
        return True

    def _store_for(self, a: Assignment) -> dist.Store | None:
        """The generation's store: hosted here (rank 0) or connected to; None while unknown."""
        if self._store is not None and self._store_generation != a.generation:
            self._drop_store()
        if a.rank == 0:
            if self._store is None:
                host = advertise_host(a.controller)
                self._store = dist.TCPStore(
                    host,
                    0,
                    is_master=True,
                    wait_for_workers=False,
                    timeout=self.collective_timeout,
                )
                self._store_generation = a.generation
                self._store_address = f"{host}:{self._store.port}"
                self._hosting = True
                self._last_round = 0
            return self._store if self.publish(a) else None
        if self._store is not None:
            return self._store
        try:
            address = self.directory.lookup(a)
        except DirectoryUnavailable as exc:
            log.info("event=rendezvous_lookup_failed job=%s error=%s", a.job_id, exc)
            return None
        if address is None:
            return None
        host, _, port = address.rpartition(":")
        if not _listening(host, int(port), self.connect_timeout.total_seconds()):
            return None  # published by a rank 0 that has since died; TCPStore would retry
        try:
            store = dist.TCPStore(
                host,
                int(port),
                is_master=False,
                wait_for_workers=False,
                timeout=self.connect_timeout,
            )
        except RuntimeError as exc:  # published by a rank 0 that has since died
            log.info(
                "event=rendezvous_connect_failed job=%s generation=%d address=%s error=%s",
                a.job_id,
                a.generation,
                address,
                _first_line(exc),
            )
            return None
        store.set_timeout(self.collective_timeout)
        self._store, self._store_generation, self._store_address = store, a.generation, address
        self._hosting = False
        self._last_round = 0
        return store

    def publish(self, a: Assignment) -> bool:
        """(Re)publish the hosted store's address to ``a``'s controller; True once it is there."""
        if not self._hosting or self._store_generation != a.generation:
            return False
        if self._published_to == a.controller:
            return True
        try:
            self.directory.publish(a, self._store_address)
        except DirectoryUnavailable as exc:
            log.info("event=rendezvous_publish_failed job=%s error=%s", a.job_id, exc)
            return False
        self._published_to = a.controller
        log.info(
            "event=rendezvous_published job=%s generation=%d worker=%s address=%s",
            a.job_id,
            a.generation,
            a.worker_id,
            self._store_address,
        )
        return True

    def _join_round(
        self, store: dist.Store, a: Assignment, feed: AssignmentFeed, deadline: float
    ) -> int | None:
        """The round all ``world_size`` ranks arrived in; None to start over."""
        backoff = Backoff(initial=0.005, maximum=0.2)

        def moved_on() -> bool:
            heartbeat.beat()
            if feed.refresh() and a.rank == 0:
                self.publish(feed.current)  # a new leader adopted us: tell it too
            return (
                feed.current.generation != a.generation
                or feed.closed
                or time.monotonic() > deadline
            )

        if a.rank == 0:
            k = store.add("round", 1)
        else:
            while (k := store.add("round", 0)) <= self._last_round:
                if moved_on():
                    return None
                backoff.sleep()
        if store.add(f"r{k}/arrived", 1) > a.world_size:
            self._last_round = k  # formed without us: wait for the next round
            return None
        backoff.reset()
        while store.add(f"r{k}/arrived", 0) < a.world_size:
            if moved_on() or store.add("round", 0) > k:
                self._last_round = k
                return None
            backoff.sleep()
        return k

    # -- collectives -----------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        try:
            return dist.all_reduce(tensor, async_op=async_op)
        except RuntimeError as exc:
            raise CollectiveFailed(_first_line(exc)) from exc

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        try:
            dist.broadcast(tensor, src)
        except RuntimeError as exc:
            raise CollectiveFailed(_first_line(exc)) from exc

    @staticmethod
    def wait(work) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise CollectiveFailed(_first_line(exc)) from exc

    # -- tearing down ------------------------------------------------------------

    def destroy(self) -> None:
        """Leave the process group (the store stays for the generation's next round)."""
        self.formed = False
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # a broken group may fail to tear down cleanly
                log.info("event=group_destroy_failed error=%s", _first_line(exc))

    def _drop_store(self) -> None:
        self._store = None
        self._store_generation = 0
        self._store_address = ""
        self._hosting = False
        self._published_to = ""
        self._last_round = 0

    def close(self) -> None:
        self.destroy()
        self._drop_store()


def _listening(host: str, port: int, timeout: float) -> bool:
    """Whether something accepts connections at ``host:port`` (refused at once if not)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
