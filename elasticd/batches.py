"""Sets of batch indices, kept as sorted disjoint half-open ranges.

The unit of exactly-once data (ARCHITECTURE invariant 6): the controller
leases ranges of batch indices to workers, and each PS shard remembers the
batch indices it has applied. Both sets grow mostly in order, so they stay a
handful of ranges however many batches a job trains on.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

Range = tuple[int, int]  # [start, end)


class BatchSet:
    """A set of non-negative integers as sorted, disjoint, non-adjacent ranges."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for r in ranges:
            start, end = (int(v) for v in r)
            self.add_range(start, end)

    def __contains__(self, index: int) -> bool:
        i = bisect.bisect_right(self._starts, index) - 1
        return i >= 0 and index < self._ends[i]

    def __len__(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchSet) and self.ranges() == other.ranges()

    def __repr__(self) -> str:
        return f"BatchSet({self.ranges()!r})"

    def add(self, index: int) -> None:
        self.add_range(index, index + 1)

    def add_range(self, start: int, end: int) -> None:
        if start < 0 or end < start:
            raise ValueError(f"batch range [{start}, {end}) is not a range of indices >= 0")
        if start == end:
            return
        # every range that overlaps or touches [start, end) merges into it
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def ranges(self) -> list[Range]:
        return list(zip(self._starts, self._ends, strict=True))

    def flat(self) -> list[int]:
        """The ranges as [start0, end0, start1, end1, ...], as protobuf carries them."""
        return [v for r in self.ranges() for v in r]

    @classmethod
    def from_flat(cls, values: Sequence[int]) -> BatchSet:
        if len(values) % 2:
            raise ValueError(f"{len(values)} values are not pairs of (start, end)")
        return cls(zip(values[0::2], values[1::2], strict=True))

    def end(self) -> int:
        """One past the largest index (0 when empty)."""
        return self._ends[-1] if self._ends else 0

    def gaps(self, below: int) -> list[Range]:
        """The ranges of [0, below) that are not in the set."""
        out, at = [], 0
        for s, e in self.ranges():
            if s >= below:
                break
            if s > at:
                out.append((at, s))
            at = max(at, e)
        if at < below:
            out.append((at, below))
        return out

    def intersection(self, other: BatchSet) -> BatchSet:
        out, i, j = BatchSet(), 0, 0
        a, b = self.ranges(), other.ranges()
        while i < len(a) and j < len(b):
            s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if s < e:
                out.add_range(s, e)
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return out
