"""Where each all-reduce generation's rendezvous store listens, kept in memory.

In ``allreduce`` mode, rank 0 of a generation starts a ``torch.distributed``
TCPStore and publishes its ``host:port`` here; the other ranks look it up and
connect. The board is the controller's memory only, never etcd: an address
is valid for one generation of one job, it is per-run data (not control
state worth replicating), and a new leader needs none of it — the workers
it adopts re-publish to it and look up with retries (ARCHITECTURE
invariant 1: etcd carries control, never data).

Fencing (invariant 3): a publish or a lookup for a generation older than the
job's sealed generation, or older than one already published, is refused as
stale. A generation newer than the one the controller has sealed is accepted:
the controller's etcd cache may trail the seal that assigned it.

Only rank 0 of a generation may publish its address: a publish for the sealed
generation from any other worker is refused (:class:`NotRankZero`), so a
stray or confused worker cannot point the others at a store of its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_JOBS = 4096  # addresses kept; the least recently published job is forgotten first
MAX_ADDRESS_LEN = 255


class UnknownJob(KeyError):
    """No such job (or it is not running)."""


class StaleGeneration(ValueError):
    """A generation older than the job's current one."""


class NotRankZero(ValueError):
    """A worker other than the generation's rank 0 tried to publish."""


@dataclass(frozen=True)
class RendezvousEntry:
    generation: int
    address: str
    worker_id: str


def validate_address(address: str) -> str:
    """``host:port`` with a port in 1-65535; raises ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or len(address) > MAX_ADDRESS_LEN or not port.isdigit():
        raise ValueError(f"address: must be host:port, got {address!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"address: port must be 1-65535, got {port}")
    return address


class RendezvousBoard:
    """The newest published rendezvous address of each job.

    ``sealed_generation(job_id)`` returns the job's sealed generation number
    as the controller knows it, or None for an unknown job. ``rank_zero(job_id,
    generation)`` names the worker holding rank 0 of that generation, or None
    when the controller does not know it (yet).
    """

    def __init__(
        self,
        sealed_generation: Callable[[str], int | None],
        rank_zero: Callable[[str, int], str | None] = lambda job_id, generation: None,
        max_jobs: int = MAX_JOBS,
    ) -> None:
        self._sealed = sealed_generation
        self._rank_zero = rank_zero
        self._max_jobs = max_jobs
        self._entries: OrderedDict[str, RendezvousEntry] = OrderedDict()
        self._lock = threading.Lock()

    def _check(self, job_id: str, generation: int) -> RendezvousEntry | None:
        if generation < 1:
            raise ValueError(f"generation: must be >= 1, got {generation}")
        sealed = self._sealed(job_id)
        if sealed is None:
            raise UnknownJob(job_id)
        if generation < sealed:
            raise StaleGeneration(
                f"generation {generation} of job {job_id} is over (current: {sealed})"
            )
        entry = self._entries.get(job_id)
        if entry is not None and generation < entry.generation:
            raise StaleGeneration(
                f"generation {generation} of job {job_id} is over "
                f"(generation {entry.generation} has a rendezvous)"
            )
        return entry

    def publish(self, job_id: str, generation: int, address: str, worker_id: str = "") -> None:
        """Record where ``generation``'s store listens; a later publish replaces it.

        Replacing is what a restarted rank 0 needs: its new store has a new port.
        """
        validate_address(address)
        with self._lock:
            self._check(job_id, generation)
            rank_zero = self._rank_zero(job_id, generation)
            if rank_zero is not None and worker_id != rank_zero:
                raise NotRankZero(
                    f"worker {worker_id or '(unnamed)'} is not rank 0 of generation "
                    f"{generation} of job {job_id} ({rank_zero} is): only rank 0 publishes"
                )
            self._entries[job_id] = RendezvousEntry(generation, address, worker_id)
            self._entries.move_to_end(job_id)
            while len(self._entries) > self._max_jobs:
                self._entries.popitem(last=False)

    def lookup(self, job_id: str, generation: int) -> str | None:
        """The address published for exactly ``generation``, or None (not yet)."""
        with self._lock:
            entry = self._check(job_id, generation)
            if entry is None or entry.generation != generation:
                return None
            return entry.address
