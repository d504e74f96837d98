"""Where a job's parameters live on the PS tier: a pure function of sizes.

Parameters are spread over the PS servers balanced by bytes (longest
processing time first). A tensor larger than an even share is cut by rows so
that no single server carries a disproportionate piece. The optimizers elasticd
allows (SGD, Adam, AdamW, Adagrad) act element by element, so a row slice of a
tensor is updated exactly as the whole tensor would be.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from elasticd.wire import DTYPES

MIN_SPLIT_BYTES = 4 << 20  # tensors below this are never split


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Slice:
    """Rows [row_start, row_end) of parameter ``param``, held by ``ps_id``."""

    param: str
    row_start: int
    row_end: int
    shape: tuple[int, ...]  # shape of the slice
    dtype: str
    ps_id: str
    whole: bool

    @property
    def key(self) -> str:
        return self.param if self.whole else f"{self.param}[{self.row_start}:{self.row_end}]"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class ShardPlacement:
    slices: tuple[Slice, ...]
    # ps_id -> boot id of the PS process the slices were placed on. A PS that
    # registers with another boot id has restarted and lost them.
    incarnations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ps_ids(self) -> list[str]:
        return sorted({s.ps_id for s in self.slices})

    def for_ps(self, ps_id: str) -> list[Slice]:
        return [s for s in self.slices if s.ps_id == ps_id]

    def bytes_per_ps(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.slices:
            out[s.ps_id] = out.get(s.ps_id, 0) + s.nbytes
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
) -> ShardPlacement:
    """Assign every tensor (or row slice of one) to a PS, balancing bytes."""
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
        slices.append(Slice(t.name, a, b, tuple(shape), t.dtype, target, whole))
    order = {t.name: i for i, t in enumerate(tensors)}
    slices.sort(key=lambda s: (order[s.param], s.row_start))
    return ShardPlacement(tuple(slices))
