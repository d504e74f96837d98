"""Where a generation's rendezvous store listens: published by rank 0, looked up by the rest.

A :class:`RendezvousDirectory` maps ``(job, generation)`` to the ``host:port``
of the TCPStore that rank 0 of that generation started. The store itself
carries the rest of the rendezvous (see :mod:`.process_group`); the directory
only answers "where". Implementations, found by the caller, not by branching:

* :class:`ControllerDirectory` — the controller's TrainingCoordinator service
  (``PublishRendezvous`` / ``LookupRendezvous``), what jobs use. The
  controller keeps addresses in memory; after a fail-over rank 0 publishes
  again to the new leader and the others look up with retries.
* :class:`FileDirectory` — one small file per generation in a directory, for
  tests and benchmarks that run workers without a controller (and usable on
  a shared filesystem).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Protocol

import grpc

from elasticd.addresses import route_source
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.security.channels import open_channel
from elasticd.worker.runtime.control import Assignment

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0  # one publish or lookup; callers retry with backoff
HOST_ENV = "ELASTICD_RENDEZVOUS_HOST"  # overrides the address peers dial for our store


class DirectoryUnavailable(RuntimeError):
    """The directory did not answer; try again later."""


class StaleRendezvous(RuntimeError):
    """The directory knows a newer generation: this assignment is over."""


class RendezvousDirectory(Protocol):
    def publish(self, a: Assignment, address: str) -> None: ...

    def lookup(self, a: Assignment) -> str | None: ...

    def close(self) -> None: ...


def advertise_host(controller: str) -> str:
    """The address other workers should dial for a store this process hosts.

    ``$ELASTICD_RENDEZVOUS_HOST`` if set; else the local address of the route
    to the controller (a UDP ``connect`` sends nothing; on a local cluster it
    gives 127.0.0.1, on a real one the interface the cluster talks on); else
    the hostname.
    """
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    host, _, port = controller.rpartition(":")
    return route_source(host, int(port) if port.isdigit() else 1) or socket.gethostname()


class ControllerDirectory:
    """The controller's in-memory rendezvous board, over gRPC."""

    def __init__(self) -> None:
        self._address = ""
        self._channel: grpc.Channel | None = None
        self._stub: job_pb2_grpc.TrainingCoordinatorStub | None = None

    def _stub_for(self, controller: str) -> job_pb2_grpc.TrainingCoordinatorStub:
        if controller != self._address or self._stub is None:
            self.close()
            self._channel = open_channel(controller)
            self._stub = job_pb2_grpc.TrainingCoordinatorStub(self._channel)
            self._address = controller
        return self._stub

    def publish(self, a: Assignment, address: str) -> None:
        try:
            self._stub_for(a.controller).PublishRendezvous(
                job_pb2.RendezvousAddress(
                    job_id=a.job_id,
                    generation=a.generation,
                    worker_id=a.worker_id,
                    address=address,
                ),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, a) from exc

    def lookup(self, a: Assignment) -> str | None:
        try:
            reply = self._stub_for(a.controller).LookupRendezvous(
                job_pb2.RendezvousQuery(job_id=a.job_id, generation=a.generation),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(exc, a) from exc
        return reply.address

    @staticmethod
    def _error(exc: grpc.RpcError, a: Assignment) -> Exception:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return StaleRendezvous(exc.details())
        return DirectoryUnavailable(
            f"controller {a.controller}: {exc.code().name} {exc.details() or ''}".strip()
        )

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None
        self._address = ""


class FileDirectory:
    """``<root>/<job>.<generation>`` holds the address; written atomically by rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, a: Assignment) -> Path:
        return self.root / f"{a.job_id}.{a.generation}"

    def publish(self, a: Assignment, address: str) -> None:
        tmp = self._path(a).with_name(f".{self._path(a).name}.{os.getpid()}")
        tmp.write_text(address)
        os.replace(tmp, self._path(a))

    def lookup(self, a: Assignment) -> str | None:
        try:
            return self._path(a).read_text() or None
        except FileNotFoundError:
            return None

    def close(self) -> None:
        pass
