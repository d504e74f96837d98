"""Who can be hit: the daemons of a local cluster, and the workers and agents in etcd.

A local cluster (``elasticd up``) records its daemons in ``<dir>/cluster.json``
(:data:`elasticd.local.STATE_FILE`): name, role and pid of etcd, the
controllers, the parameter servers and the agents. Training processes are
found through etcd: their agents report each one's pid. The leading
controller is found through its election key, and matched to a local
controller by the port it listens on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from elasticd.chaos.schedule import LEADER, FaultKind, ScheduleError
from elasticd.coord.election import observe_leader
from elasticd.coord.etcd import EtcdClient, EtcdError
from elasticd.coord.keys import Keys
from elasticd.membership import NodeInfo, WorkerReport


@dataclass(frozen=True)
class Daemon:
    name: str
    role: str  # etcd, controller, ps, agent
    pid: int


@dataclass(frozen=True)
class ClusterState:
    """What ``elasticd up`` wrote about its cluster."""

    etcd: str
    prefix: str
    daemons: tuple[Daemon, ...]

    def of_role(self, role: str) -> list[Daemon]:
        return [d for d in self.daemons if d.role == role]


def load_state(path: str | Path) -> ClusterState:
    """Read a local cluster's state file; FileNotFoundError names it when it is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / "cluster.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no local cluster state at {path}: start one with `elasticd up` "
            "(or give --injector agent for a real cluster)"
        ) from None
    daemons = tuple(Daemon(d["name"], d["role"], int(d["pid"])) for d in raw["daemons"])
    return ClusterState(raw["etcd"], raw["prefix"], daemons)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check_local_kinds(kinds: Iterable[FaultKind], state: ClusterState) -> None:
    """Refuse faults the local cluster cannot come back from by itself."""
    members = len(state.of_role("etcd"))
    for kind in kinds:
        if kind.role == "etcd" and not members:
            raise ScheduleError(f"{kind}: this cluster's etcd was not started by `elasticd up`")
        if kind == FaultKind("kill", "etcd") and members < 2:
            raise ScheduleError(
                "kill:etcd: the only etcd member would never come back; use stop:etcd"
            )


AGENT_ROLES = ("worker", "agent")  # what an agent's InjectFault can reach


def check_agent_kinds(kinds: Iterable[FaultKind]) -> None:
    for kind in kinds:
        if kind.role not in AGENT_ROLES:
            raise ScheduleError(
                f"{kind}: through agents only training processes and agents can be hit "
                "(use the local cluster's state file for ps, controller and etcd faults)"
            )


class ClusterView:
    """Reads of etcd that both injectors need: workers, agents, the leader."""

    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def workers(self, job_id: str) -> dict[str, WorkerReport]:
        kvs, _ = self.client.get_prefix(self.keys.workers(job_id))
        reports = (WorkerReport.from_json(kv.value) for kv in kvs)
        return {r.worker_id: r for r in reports}

    def nodes(self) -> dict[str, NodeInfo]:
        kvs, _ = self.client.get_prefix(self.keys.nodes)
        infos = (NodeInfo.from_json(kv.value) for kv in kvs)
        return {n.node_id: n for n in infos}

    def leader_address(self) -> str:
        try:
            value = observe_leader(self.client, self.keys.election)
        except EtcdError:
            return ""
        return value.decode() if value else ""


def targets_of(
    kinds: Sequence[FaultKind],
    workers: Iterable[str],
    agents: Iterable[str],
    daemons: ClusterState | None,
) -> dict[str, list[str]]:
    """The names a schedule may pick from, per role."""
    out: dict[str, list[str]] = {"worker": sorted(workers), "agent": sorted(agents)}
    if daemons is not None:
        for role in ("ps", "etcd"):
            out[role] = sorted(d.name for d in daemons.of_role(role))
        out["controller"] = [LEADER] if daemons.of_role("controller") else []
    return {k.role: out.get(k.role, []) for k in kinds}


class LocalResolver:
    """The pid of a target of the local cluster, looked up when the fault is due."""

    def __init__(self, state: ClusterState, view: ClusterView, job_id: str) -> None:
        self.state = state
        self.view = view
        self.job_id = job_id

    def pid_of(self, role: str, target: str) -> int:
        """0 when the target runs no more (killed earlier, or never there)."""
        if role == "worker":
            report = self.view.workers(self.job_id).get(target)
            pid = report.pid if report else 0
        elif role == "controller":
            pid = self._leader_pid()
        else:
            pid = next((d.pid for d in self.state.daemons if d.name == target), 0)
        return pid if pid and pid_alive(pid) else 0

    def _leader_pid(self) -> int:
        address = self.view.leader_address()
        if not address:
            return 0
        port = int(address.rpartition(":")[2])
        for d in self.state.of_role("controller"):
            try:
                conns = psutil.Process(d.pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                return d.pid
        return 0
