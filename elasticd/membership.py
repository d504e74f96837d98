"""Membership generations: who trains a job, in which rank, as plain data.

A job's workers form a sealed set per generation (ARCHITECTURE invariant 3).
Which slots join the next generation and which rank each gets are pure
functions of a snapshot of the cluster, so every controller computes the same
answer from the same snapshot, and tests need no server.

A worker is one training process in one slot of one node; its id is
``<node_id>.<slot>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass


def worker_id(node_id: str, slot: int) -> str:
    return f"{node_id}.{slot}"


def split_worker_id(wid: str) -> tuple[str, int]:
    node, _, slot = wid.rpartition(".")
    return node, int(slot)


@dataclass(frozen=True)
class NodeInfo:
    """What an agent advertises in its registration key."""

    node_id: str
    slots: int
    cpus: int = 0
    memory_bytes: int = 0
    gpus: int = 0
    hostname: str = ""
    address: str = ""  # host others reach this node at (torchrun's MASTER_ADDR)
    agent_address: str = ""  # host:port of the agent's NodeAgent gRPC service
    draining: bool = False  # its agent is leaving: no job chooses a worker here

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeInfo:
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Member:
    worker_id: str
    node_id: str
    rank: int
    local_rank: int


@dataclass(frozen=True)
class Generation:
    job_id: str
    number: int
    members: tuple[Member, ...]

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def worker_ids(self) -> frozenset[str]:
        return frozenset(m.worker_id for m in self.members)

    def on_node(self, node_id: str) -> list[Member]:
        return [m for m in self.members if m.node_id == node_id]

    @property
    def nodes(self) -> list[str]:
        return sorted({m.node_id for m in self.members})

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "job_id": self.job_id,
                "number": self.number,
                "members": [asdict(m) for m in self.members],
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Generation:
        d = json.loads(data)
        return cls(d["job_id"], int(d["number"]), tuple(Member(**m) for m in d["members"]))


def assign_ranks(job_id: str, number: int, worker_ids: Iterable[str]) -> Generation:
    """Ranks follow the sorted (node, slot) order: deterministic from the set alone.

    Local ranks count a node's workers in slot order, as torchrun's do.
    """
    ordered = sorted(worker_ids, key=split_worker_id)
    local: dict[str, int] = {}
    members = []
    for rank, wid in enumerate(ordered):
        node, _ = split_worker_id(wid)
        members.append(Member(wid, node, rank, local.get(node, 0)))
        local[node] = local.get(node, 0) + 1
    return Generation(job_id, number, tuple(members))


def choose_workers(
    nodes: Mapping[str, NodeInfo],
    taken_elsewhere: Mapping[str, int],
    current: Iterable[str],
    unavailable: Iterable[str],
    max_workers: int,
) -> list[str]:
    """The worker slots a job should train on next.

    Keeps the current members that are still usable (no needless churn),
    then fills free slots node by node in sorted order up to ``max_workers``.
    ``taken_elsewhere`` counts slots other jobs hold on each node;
    ``unavailable`` lists worker ids that must not be chosen (failed for good).
    """
    bad = set(unavailable)
    chosen: list[str] = []
    used: dict[str, int] = {}
    for wid in sorted(current, key=split_worker_id):
        node, slot = split_worker_id(wid)
        if node in nodes and slot < nodes[node].slots and wid not in bad:
            chosen.append(wid)
            used[node] = used.get(node, 0) + 1
    for node_id in sorted(nodes):
        free = nodes[node_id].slots - taken_elsewhere.get(node_id, 0) - used.get(node_id, 0)
        slot = 0
        while free > 0 and len(chosen) < max_workers and slot < nodes[node_id].slots:
            wid = worker_id(node_id, slot)
            if wid not in chosen and wid not in bad:
                chosen.append(wid)
                free -= 1
            slot += 1
    return sorted(chosen[:max_workers], key=split_worker_id)


@dataclass(frozen=True)
class WorkerReport:
    """A training process's state as its agent reports it (on the agent's lease)."""

    worker_id: str
    node_id: str
    generation: int
    state: str  # STARTING, RUNNING, SUCCEEDED, FAILED
    restarts: int = 0
    exit_code: int | None = None
    pid: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerReport:
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
