"""A client for programs and notebooks: a cluster and handles to its jobs.

    from elasticd import connect
    cluster = connect("127.0.0.1:2379")
    cluster.submit("job.yaml").wait()

:class:`Cluster` wraps a :class:`~elasticd.client.JobClient` (still there for
whoever needs the raw calls, as ``cluster.client``); :class:`Job` is one job
by id, so nothing is stale: every property asks the controller.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from elasticd.client import JobClient
from elasticd.coord.keys import DEFAULT_PREFIX
from elasticd.rpc import job_pb2


class JobFailed(RuntimeError):
    """``Job.wait(check=True)`` on a job that failed or was cancelled."""

    def __init__(self, status: job_pb2.JobStatus) -> None:
        super().__init__(f"job {status.job_id} {status.state}: {status.message}")
        self.status = status


class Job:
    def __init__(self, client: JobClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> job_pb2.JobStatus:
        return self.client.get(self.id)

    @property
    def state(self) -> str:
        return self.status().state

    def watch(self) -> Iterator[job_pb2.JobStatus]:
        """Its status now and on every change until it has ended (follows a fail-over)."""
        return self.client.watch(self.id)

    def wait(
        self,
        on_update: Callable[[job_pb2.JobStatus], None] | None = None,
        check: bool = False,
    ) -> job_pb2.JobStatus:
        """Block until the job has ended; its final status. ``check``: raise JobFailed
        unless it completed."""
        status = None
        for status in self.watch():
            if on_update is not None:
                on_update(status)
        assert status is not None  # a watch sends the status at once
        if check and status.state != "COMPLETED":
            raise JobFailed(status)
        return status

    def cancel(self) -> job_pb2.JobStatus:
        return self.client.cancel(self.id)

    def checkpoint(self) -> job_pb2.JobStatus:
        return self.client.checkpoint(self.id)

    def scale(self, min_workers: int, max_workers: int | None = None) -> job_pb2.JobStatus:
        return self.client.scale(self.id, min_workers, max_workers or min_workers)

    def switch(self, mode: str) -> job_pb2.JobStatus:
        return self.client.switch(self.id, mode)


class Cluster:
    def __init__(self, client: JobClient) -> None:
        self.client = client

    def submit(self, spec: str | os.PathLike | dict[str, Any], resume_from: str = "") -> Job:
        """Submit a spec: a YAML file's path, YAML text, or a dict as the YAML would load.
        A malformed spec raises SpecError listing every bad field."""
        if isinstance(spec, dict):
            return Job(
                self.client, self.client.submit_yaml(yaml.safe_dump(spec), os.getcwd(), resume_from)
            )
        text = os.fspath(spec)
        if "\n" not in text and os.path.exists(text):
            return Job(self.client, self.client.submit_file(text, resume_from))
        return Job(self.client, self.client.submit_yaml(text, os.getcwd(), resume_from))

    def job(self, job_id: str) -> Job:
        return Job(self.client, job_id)

    def jobs(self, states: tuple[str, ...] = (), name: str = "", mode: str = "") -> list[Job]:
        statuses = self.client.list(states=states, name=name, mode=mode)
        return [Job(self.client, s.job_id) for s in statuses]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    etcd: str = "127.0.0.1:2379", prefix: str = DEFAULT_PREFIX, controller: str | None = None
) -> Cluster:
    """A cluster found through etcd (``host:port[,host:port]``), or a controller directly."""
    return Cluster(
        JobClient(controller=controller, etcd=None if controller else etcd, prefix=prefix)
    )
