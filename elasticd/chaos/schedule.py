"""The fault schedule: a pure, seeded function of what may fail and when.

Faults come one per ``interval_s``, at a seeded moment within the first half
of their interval, so the second half is left for recovery before the next.
Kinds are dealt like cards: every kind once per round, in a seeded order, so
a run of ``len(kinds)`` faults or more injects every kind asked for. The
target of each fault is a seeded choice among the targets of its role.

The same arguments give the same schedule, on any machine and any Python.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ACTIONS = {"kill": "SIGKILL", "stop": "SIGSTOP"}
ROLES = ("worker", "agent", "ps", "controller", "etcd")
LEADER = "leader"  # the one target of the controller role: whoever leads at the time


class ScheduleError(ValueError):
    """Kinds or targets that cannot make a schedule; the message says why."""


@dataclass(frozen=True)
class FaultKind:
    """``action`` (kill or stop) of a process of ``role``; written ``action:role``."""

    action: str
    role: str

    @classmethod
    def parse(cls, text: str) -> FaultKind:
        action, _, role = text.strip().partition(":")
        if action not in ACTIONS or role not in ROLES:
            raise ScheduleError(
                f"fault kind {text!r}: expected ACTION:ROLE with ACTION in {sorted(ACTIONS)} "
                f"and ROLE in {list(ROLES)}"
            )
        return cls(action, role)

    @property
    def signal(self) -> str:
        return ACTIONS[self.action]

    def __str__(self) -> str:
        return f"{self.action}:{self.role}"


@dataclass(frozen=True)
class Fault:
    """One fault: at ``at_s`` seconds into the run, ``kind`` hits ``target``.

    A stop lasts ``stop_s`` seconds, then the process gets SIGCONT.
    """

    index: int
    at_s: float
    kind: FaultKind
    target: str
    stop_s: float = 0.0


def parse_kinds(text: str) -> tuple[FaultKind, ...]:
    """``"kill:worker,stop:agent"`` → kinds, in order, without repeats."""
    kinds: list[FaultKind] = []
    for part in text.split(","):
        if part.strip():
            kind = FaultKind.parse(part)
            if kind not in kinds:
                kinds.append(kind)
    if not kinds:
        raise ScheduleError("no fault kinds given")
    return tuple(kinds)


def plan_faults(
    seed: int,
    duration_s: float,
    interval_s: float,
    kinds: Sequence[FaultKind],
    targets: Mapping[str, Sequence[str]],
    stop_s: float = 5.0,
) -> list[Fault]:
    """The faults of a run of ``duration_s`` seconds, one per ``interval_s``.

    ``targets`` maps each role to the names that may be hit (sorted here, so
    the order they were found in does not matter).
    """
    if interval_s <= 0 or duration_s < 0:
        raise ScheduleError("interval must be positive and duration not negative")
    if stop_s <= 0 and any(k.action == "stop" for k in kinds):
        raise ScheduleError("a stop needs a positive stop duration")
    if not kinds:
        raise ScheduleError("no fault kinds given")
    pools = {k.role: sorted(set(targets.get(k.role, ()))) for k in kinds}
    empty = sorted(role for role, names in pools.items() if not names)
    if empty:
        raise ScheduleError(f"no targets for role(s) {', '.join(empty)}")
    rng = random.Random(f"elasticd-chaos:{seed}")
    count = int(duration_s // interval_s)
    faults: list[Fault] = []
    deck: list[FaultKind] = []
    for i in range(count):
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        at = i * interval_s + rng.uniform(0.0, interval_s / 2)
        target = rng.choice(pools[kind.role])
        faults.append(
            Fault(i, round(at, 3), kind, target, stop_s if kind.action == "stop" else 0.0)
        )
    return faults
