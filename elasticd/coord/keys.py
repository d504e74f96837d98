"""Where things live in etcd. Every key elasticd uses is spelled here.

All keys sit under one prefix (default ``/elasticd``; configurable so several
clusters can share one etcd)::

    <prefix>/nodes/<node_id>                  agent registration (leased)
    <prefix>/ps/<ps_id>                       parameter server registration (leased)
    <prefix>/controller/election/<candidate>      controller candidates (leased)
    <prefix>/jobs/<job_id>/spec               the admitted job spec
    <prefix>/jobs/<job_id>/tensors            its parameters' names, dtypes, shapes (probed once)
    <prefix>/jobs/<job_id>/status             job state, written on events only
    <prefix>/jobs/<job_id>/generation         the sealed membership generation
    <prefix>/jobs/<job_id>/placement          which PS holds which parameter slices
    <prefix>/workers/<job_id>/<worker>        worker process state (agent's lease)
    <prefix>/assign/<node_id>/<job_id>        what a node's agent must run
    <prefix>/drain/<node_id>                  ``elasticd agent --drain`` asks a node to drain

Values are JSON. Nothing under this prefix is written once per training step.

Who writes where follows from the layout: etcd grants permissions on key
ranges, so each daemon kind's writes sit under prefixes of their own
(:func:`elasticd.coord.access.etcd_roles`), and its etcd role is read-write
there and nowhere else.
Worker states live under ``workers/``, not under the job's own keys, so that
agents may write them without being able to write a job's spec, status or
generation.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "/elasticd"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"key prefix {self.prefix!r} must start and not end with '/'")

    @property
    def nodes(self) -> str:
        return f"{self.prefix}/nodes/"

    def node(self, node_id: str) -> str:
        return f"{self.nodes}{node_id}"

    @property
    def ps_servers(self) -> str:
        return f"{self.prefix}/ps/"

    def ps(self, ps_id: str) -> str:
        return f"{self.ps_servers}{ps_id}"

    @property
    def election(self) -> str:
        return f"{self.prefix}/controller/election/"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}/jobs/"

    def job(self, job_id: str) -> str:
        return f"{self.jobs}{job_id}/"

    def job_spec(self, job_id: str) -> str:
        return f"{self.job(job_id)}spec"

    def job_tensors(self, job_id: str) -> str:
        return f"{self.job(job_id)}tensors"

    def job_status(self, job_id: str) -> str:
        return f"{self.job(job_id)}status"

    def generation(self, job_id: str) -> str:
        return f"{self.job(job_id)}generation"

    def placement(self, job_id: str) -> str:
        return f"{self.job(job_id)}placement"

    @property
    def all_workers(self) -> str:
        """Every job's worker states: written by agents, so apart from the jobs' own keys."""
        return f"{self.prefix}/workers/"

    def workers(self, job_id: str) -> str:
        return f"{self.all_workers}{job_id}/"

    def worker(self, job_id: str, worker_id: str) -> str:
        return f"{self.workers(job_id)}{worker_id}"

    def assignments(self, node_id: str) -> str:
        return f"{self.prefix}/assign/{node_id}/"

    def assignment(self, node_id: str, job_id: str) -> str:
        return f"{self.assignments(node_id)}{job_id}"

    @property
    def all_assignments(self) -> str:
        return f"{self.prefix}/assign/"

    @property
    def drain_requests(self) -> str:
        """``elasticd agent --drain`` asks a node's agent to drain under this prefix."""
        return f"{self.prefix}/drain/"

    def drain_request(self, node_id: str) -> str:
        return f"{self.drain_requests}{node_id}"
