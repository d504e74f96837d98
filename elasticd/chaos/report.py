"""The report directory of a chaos run: report.json, report.md and report.png.

Every time in the report is seconds since the job was submitted. The picture
has the loss (top) and steps/s (bottom) against time, a line at every fault
and a shaded band from each fault to the job's recovery.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from elasticd.chaos.injectors import Injection
from elasticd.chaos.observer import Sample
from elasticd.chaos.outcomes import Outcome, spread, step_regressions, throughput

COLORS = {"kill": "tab:red", "stop": "tab:orange"}


@dataclass
class BaselineRecord:
    """The same job run once without faults."""

    job_id: str
    submitted: float  # monotonic
    samples: list[Sample]

    @property
    def final(self) -> Sample | None:
        return next((s for s in reversed(self.samples) if s.reachable), None)


@dataclass
class RunRecord:
    job_id: str
    spec: str
    seed: int
    injector: str
    submitted: float  # monotonic; time 0 of the report
    chaos_started: float  # monotonic; time 0 of the schedule
    samples: list[Sample]
    injections: list[Injection]
    outcomes: list[Outcome]
    baseline: BaselineRecord | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> Sample | None:
        return next((s for s in reversed(self.samples) if s.reachable), None)


def _r(x: float | None) -> float | None:
    """A time, to the millisecond (as the medians and maxima are)."""
    return None if x is None or math.isnan(x) else round(x, 3)


def _loss(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(f"{x:.6g}")


def report_dict(run: RunRecord) -> dict:
    faults = []
    for inj, out in zip(run.injections, run.outcomes, strict=True):
        f = inj.fault
        faults.append({
            "index": f.index,
            "what": str(f.kind),
            "signal": f.kind.signal,
            "target": f.target,
            "pid": inj.pid,
            "scheduled_at_s": f.at_s,
            "at_s": _r(inj.at - run.submitted),
            "resumed_at_s": None if inj.resumed_at is None else _r(inj.resumed_at - run.submitted),
            "skipped": inj.skipped or None,
            "step_at_fault": out.step_at_fault,
            "detected_after_s": _r(out.detected_after_s),
            "detected_by": out.detected_by or None,
            "recovered_after_s": _r(out.recovered_after_s),
        })  # fmt: skip
    injected = [o for i, o in zip(run.injections, run.outcomes, strict=True) if not i.skipped]
    final = run.final
    out: dict = {
        "job_id": run.job_id,
        "spec": run.spec,
        "seed": run.seed,
        "injector": run.injector,
        "chaos_started_at_s": _r(run.chaos_started - run.submitted),
        "final": {
            "state": final.state if final else "",
            "step": final.step if final else 0,
            "loss": _loss(final.loss) if final else None,
            "at_s": _r(final.t - run.submitted) if final else None,
        },
        "faults": faults,
        "summary": {
            "faults": len(faults),
            "injected": len(injected),
            "detected": sum(o.detected_after_s is not None for o in injected),
            "recovered": sum(o.recovered_after_s is not None for o in injected),
            "detection_s": spread([o.detected_after_s for o in injected]),
            "recovery_s": spread([o.recovered_after_s for o in injected]),
        },
        # The step fell here (a restore from a checkpoint): the updates between were lost.
        "step_regressions": [
            {"at_s": _r(t - run.submitted), "from_step": a, "to_step": b}
            for t, a, b in step_regressions(run.samples)
        ],
        "samples": len(run.samples),
        "notes": run.notes,
        "baseline": None,
    }
    if run.baseline is not None:
        b = run.baseline.final
        base_loss = _loss(b.loss) if b else None
        out["baseline"] = {
            "job_id": run.baseline.job_id,
            "state": b.state if b else "",
            "final_loss": base_loss,
            "duration_s": _r(b.t - run.baseline.submitted) if b else None,
        }
        chaos_loss = out["final"]["loss"]
        if base_loss and chaos_loss is not None:
            out["final"]["loss_vs_baseline"] = round(chaos_loss / base_loss, 4)
    return out


def _fmt(x: float | None, unit: str = " s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def report_markdown(d: dict) -> str:
    s, final = d["summary"], d["final"]
    lines = [
        f"# elasticd chaos: job {d['job_id']}",
        "",
        f"Spec `{d['spec']}`, seed {d['seed']}, faults through {d['injector']}.",
        f"The job ended **{final['state']}** at step {final['step']}, loss {_g(final['loss'])}.",
    ]
    if d["baseline"]:
        b = d["baseline"]
        lines.append(
            f"Without faults (job {b['job_id']}) it ended {b['state']} with loss "
            f"{_g(b['final_loss'])}"
            + (f" (ratio {final['loss_vs_baseline']})." if "loss_vs_baseline" in final else ".")
        )
    lines += [
        "",
        f"{s['injected']} of {s['faults']} faults injected, {s['detected']} detected, "
        f"{s['recovered']} recovered. Detection: median {_fmt(s['detection_s']['median'])}, "
        f"max {_fmt(s['detection_s']['max'])}. Recovery: median "
        f"{_fmt(s['recovery_s']['median'])}, max {_fmt(s['recovery_s']['max'])}.",
        "",
        "| # | at | fault | target | detected after | by | recovered after |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in d["faults"]:
        target = f["target"] + (f" (skipped: {f['skipped']})" if f["skipped"] else "")
        lines.append(
            f"| {f['index']} | {_fmt(f['at_s'])} | {f['what']} | {target} | "
            f"{_fmt(f['detected_after_s'])} | {f['detected_by'] or '-'} | "
            f"{_fmt(f['recovered_after_s'])} |"
        )
    for r in d["step_regressions"]:
        lines.append(
            f"\nAt {_fmt(r['at_s'])} the step fell from {r['from_step']} to {r['to_step']}: "
            "the job went back to an earlier state (a restore from a checkpoint), losing the "
            "updates between."
        )
    lines += ["", "![loss and steps/s against time](report.png)", ""]
    lines += [f"- {n}" for n in d["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def plot(run: RunRecord, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    t0 = run.submitted
    answered = [s for s in run.samples if s.reachable]
    fig, (ax_loss, ax_rate) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5), dpi=80)
    points = [(s.t - t0, s.loss) for s in answered if s.loss > 0 and not math.isnan(s.loss)]
    if points:
        ax_loss.plot(*zip(*points, strict=True), color="tab:blue", lw=1.2, label="loss")
    if run.baseline is not None:
        b0 = run.baseline.submitted
        base = [(s.t - b0, s.loss) for s in run.baseline.samples
                if s.reachable and s.loss > 0 and not math.isnan(s.loss)]  # fmt: skip
        if base:
            ax_loss.plot(*zip(*base, strict=True), color="0.5", lw=1, ls="--", label="no faults")
    if points:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    rate = throughput(run.samples)
    if rate:
        ax_rate.plot([t - t0 for t, _ in rate], [r for _, r in rate], color="tab:green", lw=1)
    ax_rate.set_ylabel("steps/s")
    ax_rate.set_xlabel("seconds since submission")
    for inj, out in zip(run.injections, run.outcomes, strict=True):
        if inj.skipped:
            continue
        at = inj.at - t0
        color = COLORS[inj.fault.kind.action]
        end = at + out.recovered_after_s if out.recovered_after_s is not None else None
        for ax in (ax_loss, ax_rate):
            ax.axvline(at, color=color, lw=1)
            if end is not None:
                ax.axvspan(at, end, color=color, alpha=0.15, lw=0)
        ax_loss.annotate(f"{inj.fault.kind} {inj.fault.target}", (at, 0.98), xycoords=("data", "axes fraction"),
                         rotation=90, va="top", ha="right", fontsize=7, color=color)  # fmt: skip
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title(f"elasticd chaos: job {run.job_id}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run: RunRecord, out_dir: str | Path) -> dict:
    """Write the three files; returns the dict of report.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = report_dict(run)
    (out_dir / "report.json").write_text(json.dumps(d, indent=2) + "\n")
    (out_dir / "report.md").write_text(report_markdown(d))
    plot(run, out_dir / "report.png")
    return d
