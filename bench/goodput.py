"""Goodput under faults: the reference job with a fault every ``interval`` seconds, over
the same job without faults, both on one fresh local cluster in one run.

Faults are mixed, as ``elasticd chaos`` injects them on a seeded schedule: a
training process SIGKILLed, an agent, a PS and the leading controller each
SIGSTOPped for longer than the lease TTL and then resumed (in local mode
nothing would start a SIGKILLed daemon again). The job is charlm in
ps-async with hot replicas and checkpoints, sized so that its fault-free run
outlasts the schedule.

``goodput`` is the fault-free run's duration over the faulty one's, each from
submission to completion: samples per second under faults over samples per
second without. Both include the same start-up, which flatters neither much.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from elasticd.chaos.runner import ChaosOptions, run_chaos
from elasticd.chaos.schedule import FaultKind
from elasticd.client import JobClient
from elasticd.local import STATE_FILE, LocalCluster

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KINDS = ("kill:worker", "stop:agent", "stop:ps", "stop:controller")
LEASE_TTL_S = 5
STOP_S = 8.0  # longer than the lease TTL: the stopped daemon is taken for dead
PROBE_S = (15.0, 30.0)  # the probe job settles this long, then its speed is measured this long


def _spec(steps: int, path: Path) -> Path:
    spec = yaml.safe_load((EXAMPLES / "charlm.yaml").read_text())
    spec.update(
        name="goodput",
        task=str(EXAMPLES / spec["task"]),
        steps=steps,
        max_restarts=20,
        report_every_steps=5,
        ps={**spec.get("ps", {}), "replicas": 2},
        checkpoint={"every_steps": 200},
    )
    path.write_text(yaml.safe_dump(spec))
    return path


def _steps_per_s(c: LocalCluster, workdir: Path) -> float:
    """The job's fault-free speed, after its start-up, from a probe run that is cancelled."""
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    try:
        job_id = client.submit_file(str(_spec(10**7, workdir / "probe.yaml")))
        deadline = time.monotonic() + 120
        while client.get(job_id).step < 20:
            if time.monotonic() > deadline:
                raise TimeoutError("the probe job did not start")
            time.sleep(0.2)
        time.sleep(PROBE_S[0])  # past its start-up and the agents' warm interpreters
        t0, s0 = time.monotonic(), client.get(job_id).step
        time.sleep(PROBE_S[1])
        rate = (client.get(job_id).step - s0) / (time.monotonic() - t0)
        client.cancel(job_id)
        return rate
    finally:
        client.close()


def measure_goodput(workdir: Path, interval_s: float, faults: int, seed: int = 11) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    with LocalCluster(workdir / "cluster", lease_ttl=LEASE_TTL_S) as c:
        c.start(ps=2, agents=2)
        rate = _steps_per_s(c, workdir)
        # the fault-free run outlasts the schedule by one and a half intervals: the run
        # under faults, slower, then surely lives through every fault of it
        steps = int(rate * (faults + 1.5) * interval_s)
        opts = ChaosOptions(
            spec=str(_spec(steps, workdir / "job.yaml")),
            out_dir=str(workdir / f"report-{int(interval_s)}s"),
            kinds=tuple(FaultKind.parse(k) for k in KINDS),
            seed=seed,
            duration_s=faults * interval_s,
            interval_s=interval_s,
            stop_s=STOP_S,
            baseline=True,
            state_path=str(c.base_dir / STATE_FILE),
            warmup_steps=20,
            timeout_s=faults * interval_s * 4 + 600,
        )
        report = run_chaos(opts)
    base, final = report["baseline"], report["final"]
    ok = base and base["state"] == "COMPLETED" and final["state"] == "COMPLETED"
    return {
        "goodput": round(base["duration_s"] / final["at_s"], 3) if ok else None,
        "steps": steps,
        "interval_s": interval_s,
        "faults_injected": report["summary"]["injected"],
        "faults_recovered": report["summary"]["recovered"],
        "recovery_s": report["summary"]["recovery_s"],
        "step_regressions": len(report["step_regressions"]),
        "fault_free_s": base["duration_s"] if base else None,
        "faulty_s": final["at_s"],
        "final_state": final["state"],
        "report": opts.out_dir,
    }


def both(reports: Path, faults: int = 5) -> dict:
    """``goodput`` (a fault every 60 s) and ``goodput_20s``, with their details."""
    out: dict = {}
    for interval, key in ((60.0, "goodput"), (20.0, "goodput_20s")):
        g = measure_goodput(reports / f"goodput-{int(interval)}s", interval, faults)
        out[key], out[f"{key}_detail"] = g["goodput"], g
    return out


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench goodput")
    p.add_argument("--faults", type=int, default=5)
    p.add_argument("--reports", default="bench/results", help="where the chaos reports stay")
    args = p.parse_args(argv)
    return both(Path(args.reports), args.faults)
