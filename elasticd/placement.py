"""Where a job's parameters live on the PS tier: a pure function of sizes.

Parameters are spread over the PS servers balanced by bytes (longest
processing time first). A tensor larger than an even share is cut by rows so
that no single server carries a disproportionate piece. The optimizers elasticd
allows (SGD, Adam, AdamW, Adagrad) act element by element, so a row slice of a
tensor is updated exactly as the whole tensor would be.

The slices placed on one PS form a *group*, named after that PS: the unit a
PS keeps as one shard (job, group), versions, snapshots and hands over. With
``ps.replicas: 2`` every group also has a backup on the next PS of the ring,
which applies every update the primary applies, in the same order. When a PS
is lost, :func:`failover` promotes the backups of its groups and picks new
backups; groups never change their slices, so a group's version and optimizer
state move with it unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from elasticd.dtypes import ITEMSIZE

MIN_SPLIT_BYTES = 4 << 20  # tensors below this are never split


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def tensors_to_json(tensors: Sequence[TensorSpec]) -> str:
    return json.dumps([{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in tensors])


def tensors_from_json(text: str | bytes) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in json.loads(text))


@dataclass(frozen=True)
class Slice:
    """Rows [row_start, row_end) of parameter ``param``, held by ``ps_id``."""

    param: str
    row_start: int
    row_end: int
    shape: tuple[int, ...]  # shape of the slice
    dtype: str
    ps_id: str  # the PS that holds the primary copy and serves workers
    whole: bool
    group: str = ""  # the shard this slice belongs to ("": ps_id, placements before groups)
    backup: str = ""  # the PS that holds the backup copy ("": none)

    @property
    def shard(self) -> str:
        """The name of the group (the PS shard) this slice is kept in."""
        return self.group or self.ps_id

    @property
    def key(self) -> str:
        return self.param if self.whole else f"{self.param}[{self.row_start}:{self.row_end}]"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ShardPlacement:
    slices: tuple[Slice, ...]
    # ps_id -> boot id of the PS process the slices were placed on. A PS that
    # registers with another boot id has restarted and lost them.
    incarnations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ps_ids(self) -> list[str]:
        """Every PS that holds a copy of some group, primary or backup."""
        return sorted({s.ps_id for s in self.slices} | {s.backup for s in self.slices if s.backup})

    @property
    def groups(self) -> list[str]:
        return sorted({s.shard for s in self.slices})

    def in_group(self, group: str) -> list[Slice]:
        return [s for s in self.slices if s.shard == group]

    def holders(self, group: str) -> tuple[str, str]:
        """(primary, backup) of ``group``; backup is "" when it has none."""
        first = next(s for s in self.slices if s.shard == group)
        return first.ps_id, first.backup

    @property
    def replicated(self) -> bool:
        return any(s.backup for s in self.slices)

    def bytes_per_ps(self) -> dict[str, int]:
        """Bytes of parameters each PS holds, primary and backup copies counted alike."""
        out: dict[str, int] = {}
        for s in self.slices:
            for p in filter(None, (s.ps_id, s.backup)):
                out[p] = out.get(p, 0) + s.nbytes
        return out

    def backup_bytes_per_ps(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.slices:
            if s.backup:
                out[s.backup] = out.get(s.backup, 0) + s.nbytes
        return out

    def with_incarnations(self, incarnations: Mapping[str, str]) -> ShardPlacement:
        return replace(self, incarnations={p: incarnations.get(p, "") for p in self.ps_ids})

    def to_json(self) -> str:
        return json.dumps(
            {"slices": [asdict(s) for s in self.slices], "incarnations": dict(self.incarnations)}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardPlacement:
        data = json.loads(text)
        if isinstance(data, list):  # written before placements carried incarnations
            data = {"slices": data}
        slices = tuple(Slice(**{**d, "shape": tuple(d["shape"])}) for d in data["slices"])
        return cls(slices, dict(data.get("incarnations") or {}))


def _split(t: TensorSpec, pieces: int) -> list[tuple[int, int]]:
    rows = t.shape[0]
    pieces = max(1, min(pieces, rows))
    bounds = [rows * i // pieces for i in range(pieces + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(pieces)]


def place(
    tensors: Sequence[TensorSpec],
    ps_ids: Sequence[str],
    min_split_bytes: int = MIN_SPLIT_BYTES,
    replicas: int = 1,
) -> ShardPlacement:
    """Assign every tensor (or row slice of one) to a PS, balancing bytes.

    With ``replicas`` 2 and more than one PS, the group placed on each PS has
    its backup on the next PS in sorted order (a ring), so every PS carries
    one group's backup and the load stays balanced.
    """
    if not ps_ids:
        raise ValueError("no parameter server to place parameters on")
    servers = sorted(ps_ids)
    total = sum(t.nbytes for t in tensors)
    share = max(math.ceil(total / len(servers)), 1)
    pieces: list[tuple[TensorSpec, int, int, bool]] = []
    for t in tensors:
        if t.shape and t.shape[0] > 1 and t.nbytes > max(share, min_split_bytes):
            parts = _split(t, math.ceil(t.nbytes / share))
            pieces.extend((t, a, b, False) for a, b in parts)
        else:
            rows = t.shape[0] if t.shape else 0
            pieces.append((t, 0, rows, True))

    def size(p: tuple[TensorSpec, int, int, bool]) -> int:
        t, a, b, whole = p
        return t.nbytes if whole else t.nbytes // t.shape[0] * (b - a)

    load = dict.fromkeys(servers, 0)
    slices = []
    for p in sorted(pieces, key=lambda p: (-size(p), p[0].name, p[1])):
        t, a, b, whole = p
        target = min(servers, key=lambda s: (load[s], servers.index(s)))
        load[target] += size(p)
        shape = t.shape if whole else (b - a, *t.shape[1:])
        backup = _ring_next(servers, target) if replicas > 1 else ""
        slices.append(Slice(t.name, a, b, tuple(shape), t.dtype, target, whole, target, backup))
    order = {t.name: i for i, t in enumerate(tensors)}
    slices.sort(key=lambda s: (order[s.param], s.row_start))
    return ShardPlacement(tuple(slices))


def rank_placement(tensors: Sequence[TensorSpec], world: int) -> ShardPlacement:
    """How an allreduce checkpoint is cut: rank ``r`` of ``world`` writes group ``rank-r``."""
    return place(tensors, [f"rank-{r}" for r in range(max(world, 1))])


def _ring_next(servers: Sequence[str], ps_id: str) -> str:
    if len(servers) < 2:
        return ""
    return servers[(servers.index(ps_id) + 1) % len(servers)]


def rehome(saved: ShardPlacement, ps_ids: Sequence[str], replicas: int = 1) -> ShardPlacement:
    """``saved``'s groups, each whole, on ``ps_ids``: largest first onto the least loaded.

    A restore that keeps a checkpoint's groups lets every PS read its groups'
    stored shards as they were written, each with its own version and record
    of applied batches, instead of a cut of the whole state that mixes them.
    With ``replicas`` 2 and more than one PS, a group's backup is on the next
    PS after its primary in sorted order.
    """
    if not ps_ids:
        raise ValueError("no parameter server to place parameters on")
    servers = sorted(ps_ids)
    sizes = {g: sum(s.nbytes for s in saved.in_group(g)) for g in saved.groups}
    load = dict.fromkeys(servers, 0)
    home: dict[str, str] = {}
    for g in sorted(sizes, key=lambda g: (-sizes[g], g)):
        home[g] = min(servers, key=lambda p: (load[p], p))
        load[home[g]] += sizes[g]
    backup = {
        g: _ring_next(servers, p) if replicas > 1 and len(servers) > 1 else ""
        for g, p in home.items()
    }
    slices = tuple(
        replace(s, group=s.shard, ps_id=home[s.shard], backup=backup[s.shard]) for s in saved.slices
    )
    return ShardPlacement(slices)


@dataclass(frozen=True, order=True)
class Copy:
    """Fill ``group``'s new backup on ``target`` from its primary on ``source``."""

    group: str
    source: str
    target: str


def failover(
    placement: ShardPlacement, live: Mapping[str, str], replicas: int
) -> tuple[ShardPlacement, list[Copy]] | None:
    """The placement after PS losses when every group kept a live copy, else None.

    ``live`` maps each registered PS to its boot id; a copy counts only on a PS
    registered under the boot id the placement names (a restarted PS lost it).
    A group whose primary is lost is served by its backup; a group without a
    live backup gets a new one (``replicas`` > 1) on the live PS that carries
    the fewest bytes, other than its primary. The returned copies fill those.
    """

    def alive(p: str) -> bool:
        return bool(p) and p in live and live[p] == placement.incarnations.get(p, live[p])

    plan: dict[str, tuple[str, str]] = {}
    for g in placement.groups:
        primary, backup = placement.holders(g)
        holders = [p for p in (primary, backup) if alive(p)]
        if not holders:
            return None
        plan[g] = (holders[0], holders[1] if len(holders) > 1 else "")
    load: dict[str, int] = dict.fromkeys(sorted(live), 0)
    for g, (primary, backup) in plan.items():
        size = sum(s.nbytes for s in placement.in_group(g))
        for p in filter(None, (primary, backup)):
            load[p] += size
    copies = []
    for g in sorted(plan):
        primary, backup = plan[g]
        if backup or replicas < 2:
            continue
        candidates = [p for p in sorted(live) if p != primary]
        if not candidates:
            continue  # one PS left: the group runs without a backup until another registers
        target = min(candidates, key=lambda p: (load[p], p))
        load[target] += sum(s.nbytes for s in placement.in_group(g))
        plan[g] = (primary, target)
        copies.append(Copy(g, primary, target))
    slices = tuple(
        replace(s, group=s.shard, ps_id=plan[s.shard][0], backup=plan[s.shard][1])
        for s in placement.slices
    )
    moved = ShardPlacement(slices, placement.incarnations)
    return moved.with_incarnations(live), copies


@dataclass(frozen=True, order=True)
class Move:
    """Copy ``group`` from its primary on ``source`` to ``target``, as its new
    primary (``backup`` False) or its new backup, because a PS drains."""

    group: str
    source: str
    target: str
    backup: bool


def drain_moves(
    placement: ShardPlacement, live: Mapping[str, str], draining: frozenset[str]
) -> tuple[ShardPlacement, list[Move]] | None:
    """The placement with no copy on a ``draining`` PS, and the copies that make it.

    Every copy (primary or backup) on a draining PS goes to the live,
    non-draining PS that carries the fewest bytes and does not hold the
    group's other copy; the data always comes from the group's primary, which
    is still serving. None when some copy has nowhere to go: the draining PS
    then stops at once, and its groups fail over or are restored as after a loss.
    """
    takers = sorted(p for p in live if p not in draining)
    load = {p: placement.bytes_per_ps().get(p, 0) for p in takers}
    plan = {g: placement.holders(g) for g in placement.groups}
    moves: list[Move] = []
    for g in sorted(plan):
        size = sum(s.nbytes for s in placement.in_group(g))
        for role in (0, 1):
            holder = plan[g][role]
            if not holder or holder not in draining:
                continue
            other = plan[g][1 - role]
            candidates = [p for p in takers if p != other]
            if not candidates:
                if role == 1:  # a backup with nowhere to go: the group runs without one
                    plan[g] = (plan[g][0], "")
                    continue
                if other not in takers:
                    return None
                # A primary whose only taker holds its backup: the copy becomes the
                # primary there (overwritten from the fenced primary), without a backup.
                moves.append(Move(g, placement.holders(g)[0], other, backup=False))
                plan[g] = (other, "")
                continue
            target = min(candidates, key=lambda p: (load[p], p))
            load[target] += size
            moves.append(Move(g, placement.holders(g)[0], target, backup=role == 1))
            plan[g] = (target, plan[g][1]) if role == 0 else (plan[g][0], target)
    slices = tuple(
        replace(s, group=s.shard, ps_id=plan[s.shard][0], backup=plan[s.shard][1])
        for s in placement.slices
    )
    moved = ShardPlacement(slices, placement.incarnations)
    return moved.with_incarnations({**placement.incarnations, **live}), moves
