"""What each fault did to the job, decided from the samples alone (no I/O).

*Detected after*: seconds from the fault to the first sample whose view of
the cluster differs from the one at the fault: a new generation, a worker
gone, restarted (new pid) or in another state, another set of parameter
servers, another leader, or a controller that does not answer. A fault
nothing noticed (a short stop the job rode out) has none.

*Recovered after*: seconds from the fault to the first sample, at or after
detection, in which the job's step is past where it stood at the fault (or
the job completed). A job that never got there has none.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from elasticd.chaos.observer import Sample

THROUGHPUT_WINDOW_S = 1.0  # steps/s is averaged over this much time


@dataclass(frozen=True)
class Outcome:
    step_at_fault: int
    detected_after_s: float | None
    detected_by: str  # which part of the view changed first; "" if none
    recovered_after_s: float | None


def view_change(before: Sample, after: Sample) -> str:
    """The first difference that counts as the fault being seen; "" when none."""
    if not after.reachable:
        return "controller unreachable"
    if not before.reachable:
        return ""
    if after.generation != before.generation:
        return "generation"
    if after.leader != before.leader:
        return "leader"
    if after.ps != before.ps:
        return "parameter servers"
    was = {w.worker_id: w for w in before.workers}
    now = {w.worker_id: w for w in after.workers}
    if set(was) - set(now):
        return "worker gone"
    for wid, w in was.items():
        other = now[wid]
        if other.state == "GONE" and w.state != "GONE":
            return "worker gone"
        if (other.pid, other.restarts) != (w.pid, w.restarts):
            return "worker restarted"
        if other.state != w.state:
            return f"worker {other.state.lower()}"
    return ""


def judge(fault_t: float, samples: Sequence[Sample]) -> Outcome:
    """The outcome of a fault at monotonic time ``fault_t`` (samples in time order)."""
    before = [s for s in samples if s.t <= fault_t and s.reachable]
    after = [s for s in samples if s.t > fault_t]
    base = before[-1] if before else next((s for s in after if s.reachable), None)
    if base is None:
        return Outcome(0, None, "", None)
    detected_t, detected_by = None, ""
    for s in after:
        if s.terminal:
            break  # a job that ended shows no more of the fault
        change = view_change(base, s)
        if change:
            detected_t, detected_by = s.t, change
            break
    recovered_t = None
    start = detected_t if detected_t is not None else fault_t
    for s in after:
        if s.t >= start and s.reachable and (s.step > base.step or s.state == "COMPLETED"):
            recovered_t = s.t
            break
    return Outcome(
        base.step,
        None if detected_t is None else detected_t - fault_t,
        detected_by,
        None if recovered_t is None else recovered_t - fault_t,
    )


def spread(values: Sequence[float | None]) -> dict:
    """Median and maximum of the values that exist, and how many there are."""
    present = [v for v in values if v is not None]
    if not present:
        return {"count": 0, "median": None, "max": None}
    return {
        "count": len(present),
        "median": round(statistics.median(present), 3),
        "max": round(max(present), 3),
    }


def throughput(
    samples: Sequence[Sample], window_s: float = THROUGHPUT_WINDOW_S
) -> list[tuple[float, float]]:
    """(t, steps/s) at each answered sample, over the ``window_s`` before it."""
    answered = [s for s in samples if s.reachable]
    out: list[tuple[float, float]] = []
    lo = 0
    for s in answered:
        while answered[lo].t < s.t - window_s:
            lo += 1
        first = answered[lo]
        dt = s.t - first.t
        # A step that fell (a restore from a checkpoint) counts as no progress.
        out.append((s.t, max(s.step - first.step, 0) / dt if dt > 0 else 0.0))
    return out


def step_regressions(samples: Sequence[Sample]) -> list[tuple[float, int, int]]:
    """(t, step before, step after) wherever the job's step fell: updates were lost."""
    answered = [s for s in samples if s.reachable]
    return [
        (b.t, a.step, b.step)
        for a, b in zip(answered, answered[1:], strict=False)
        if b.step < a.step
    ]
