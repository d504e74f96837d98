"""Following a job from the command line: a live progress bar on a terminal, plain
lines otherwise.

Both are fed by WatchJob (:meth:`elasticd.client.JobClient.watch`). On a
terminal, a ``rich`` bar shows step/total, loss, samples/s, workers,
generation and the ETA (from the controller's measured step rate). When
stdout is not a terminal (a log file, CI) it prints one plain line per
change, at most one every ``PLAIN_INTERVAL_S`` unless the state, the
generation or the workers changed, and always the last status.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import TextIO

from elasticd.rpc import job_pb2

PLAIN_INTERVAL_S = 2.0  # a plain line at most this often while nothing but progress moves


def eta_s(s: job_pb2.JobStatus) -> float | None:
    """Seconds to the last step at the measured rate; None when it cannot be told."""
    if s.total_steps <= 0 or s.steps_per_s <= 0 or s.state != "RUNNING":
        return None
    return max(s.total_steps - s.step, 0) / s.steps_per_s


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_line(s: job_pb2.JobStatus, rate: float | None = None) -> str:
    """``rate``: the samples/s to show instead of the status's own (see :class:`Rate`)."""
    loss = "-" if math.isnan(s.loss) else f"{s.loss:.4f}"
    steps = f"step {s.step}/{s.total_steps}" if s.total_steps else f"restarts {s.restarts}"
    rate = s.samples_per_s if rate is None else rate
    return (
        f"[{s.state}] gen {s.generation}  workers {len(s.workers)}  {steps}  loss {loss}  "
        f"samples/s {rate:.1f}  eta {_duration(eta_s(s))}"
    )


class Rate:
    """The samples/s to show: a job that has ended measures 0, so it keeps showing
    the last rate measured while it ran."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, s: job_pb2.JobStatus) -> float:
        if s.state == "RUNNING" or s.samples_per_s > 0:
            self.last = s.samples_per_s
        return self.last


def _shape(s: job_pb2.JobStatus) -> tuple:
    return (s.state, s.generation, tuple(w.worker_id for w in s.workers))


def follow_plain(
    statuses: Iterable[job_pb2.JobStatus],
    out: TextIO,
    interval_s: float = PLAIN_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
) -> job_pb2.JobStatus | None:
    """One line per change, rate-limited; the last status is always printed."""
    last = printed = None
    printed_at = -math.inf
    rate = Rate()
    for s in statuses:
        last = s
        shown = rate(s)
        if printed is None or _shape(s) != _shape(printed) or clock() - printed_at >= interval_s:
            print(progress_line(s, shown), file=out, flush=True)
            printed, printed_at = s, clock()
    if last is not None and last is not printed:
        print(progress_line(last, rate.last), file=out, flush=True)
    return last


def follow_bar(statuses: Iterable[job_pb2.JobStatus], out: TextIO) -> job_pb2.JobStatus | None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    fields = "loss {task.fields[loss]}  samples/s {task.fields[rate]}  workers {task.fields[workers]}  gen {task.fields[gen]}  eta {task.fields[eta]}"
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn(fields),
        console=Console(file=out),
    )
    last = None
    rate = Rate()
    with progress:
        task = progress.add_task(
            "PENDING", total=None, steps="-", loss="-", rate="-", workers=0, gen=0, eta="-"
        )
        for s in statuses:
            last = s
            progress.update(
                task,
                description=s.state,
                total=s.total_steps or None,
                completed=s.step,
                steps=f"{s.step}/{s.total_steps}" if s.total_steps else f"restarts {s.restarts}",
                loss="-" if math.isnan(s.loss) else f"{s.loss:.4f}",
                rate=f"{rate(s):.1f}",
                workers=len(s.workers),
                gen=s.generation,
                eta=_duration(eta_s(s)),
            )
    return last


def follow(
    statuses: Iterable[job_pb2.JobStatus], out: TextIO | None = None
) -> job_pb2.JobStatus | None:
    """Show a job's statuses until the last one; the bar only on a terminal."""
    out = sys.stdout if out is None else out
    if out.isatty():
        return follow_bar(statuses, out)
    return follow_plain(statuses, out)
