"""The controller's view of etcd: caches of nodes, PS servers and jobs.

Each cache is a list-then-watch copy of one prefix (see
:class:`elasticd.coord.cache.PrefixCache`); this module turns their bytes into
the plain snapshots that :mod:`.planning` decides on.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from elasticd.coord.cache import PrefixCache
from elasticd.coord.etcd import EtcdClient
from elasticd.coord.keys import Keys
from elasticd.jobspec import JobSpec
from elasticd.membership import Generation, NodeInfo, WorkerReport
from elasticd.placement import ShardPlacement, tensors_from_json
from elasticd.server.controller.planning import ClusterSnapshot, JobSnapshot
from elasticd.server.controller.records import TERMINAL, JobRecord


class JobNotFound(KeyError):
    pass


class EtcdView:
    def __init__(self, client: EtcdClient, keys: Keys, on_change: Callable[[], None]) -> None:
        self.nodes = PrefixCache(client, keys.nodes, on_change)
        self.ps = PrefixCache(client, keys.ps_servers, on_change)
        self.jobs = PrefixCache(client, keys.jobs, on_change)
        # agents write worker states under a prefix of their own (etcd roles are by prefix)
        self.workers = PrefixCache(client, keys.all_workers, on_change)
        self._caches = (self.nodes, self.ps, self.jobs, self.workers)

    def start(self) -> EtcdView:
        for cache in self._caches:
            cache.start()
        for cache in self._caches:
            cache.wait_synced()
        return self

    def stop(self) -> None:
        for cache in self._caches:
            cache.stop()

    def wait_for_revision(self, revision: int) -> None:
        """Wait until the job cache reflects a write made at ``revision``."""
        self.jobs.wait_for_revision(revision)

    def _job_entries(self, job_id: str) -> dict[str, tuple[bytes, int]]:
        prefix = f"{job_id}/"
        entries, _ = self.jobs.entries()
        return {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix)}

    def job_items(self, job_id: str) -> dict[str, bytes]:
        return {k: v for k, (v, _) in self._job_entries(job_id).items()}

    def job_ids(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.jobs.items()})

    def snapshot(self, job_id: str) -> JobSnapshot:
        """The job as the cache holds it, with the revisions a conditional write compares."""
        entries = self._job_entries(job_id)
        if "spec" not in entries or "status" not in entries:
            raise JobNotFound(job_id)
        gen_raw, gen_rev = entries.get("generation", (b"", 0))
        placement_raw, _ = entries.get("placement", (b"", 0))
        tensors_raw, _ = entries.get("tensors", (b"", 0))
        prefix = f"{job_id}/"
        workers = {
            k[len(prefix) :]: WorkerReport.from_json(v)
            for k, v in self.workers.items().items()
            if k.startswith(prefix)
        }
        status, status_rev = entries["status"]
        return JobSnapshot(
            JobSpec.from_json(entries["spec"][0]),
            JobRecord.from_json(status),
            Generation.from_json(gen_raw) if gen_raw else None,
            workers,
            placement=ShardPlacement.from_json(placement_raw) if placement_raw else None,
            revision=status_rev,
            generation_revision=gen_rev,
            tensors=tensors_from_json(tensors_raw) if tensors_raw else None,
        )

    def cluster(self) -> ClusterSnapshot:
        nodes = {k: NodeInfo.from_json(v) for k, v in self.nodes.items().items()}
        registered = {k: json.loads(v) for k, v in self.ps.items().items()}
        ps = {k: d["address"] for k, d in registered.items()}
        incarnations = {k: d.get("incarnation", "") for k, d in registered.items()}
        taken: dict[str, dict[str, int]] = {}
        for job_id in self.job_ids():
            try:
                snap = self.snapshot(job_id)
            except JobNotFound:
                continue
            if snap.record.state in TERMINAL or snap.generation is None:
                continue
            per_node: dict[str, int] = {}
            for m in snap.generation.members:
                per_node[m.node_id] = per_node.get(m.node_id, 0) + 1
            taken[job_id] = per_node
        draining = frozenset(k for k, d in registered.items() if d.get("draining"))
        return ClusterSnapshot(nodes, ps, taken, incarnations, draining)

    def placement(self, job_id: str) -> ShardPlacement | None:
        raw = self.job_items(job_id).get("placement")
        return ShardPlacement.from_json(raw) if raw else None
