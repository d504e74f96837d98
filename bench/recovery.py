"""What a failure costs the survivors: elasticd against torchrun and torchft, side by side.

``python -m bench recovery [--json] [--kills 5] [--lease-ttl 5] [--skip-torchft]``

Every variant trains the same MLP as ``bench allreduce`` (8 x Linear(1024):
32 MiB of fp32 parameters) with 2 workers on gloo, one thread each, and logs
the wall-clock time of every step. A failure's cost is the **pause**: the
longest gap between two steps of a survivor, from 1 s before the SIGKILL
until the replaced worker has taken 5 steps with it again. Each figure is
the median (and max) over ``--kills`` SIGKILLs of one training process:

* ``elasticd``: an allreduce job on a local cluster (``LocalCluster``,
  real etcd, controller and agents). The survivor re-forms alone at once;
  the replacement (a warm interpreter) joins once it is ready.
* ``torchrun``: ``torchrun --nproc-per-node 2`` running a snapshotting DDP
  script (:mod:`bench.snapshot_mlp`), as torchrun's documentation teaches:
  any failure restarts every process, which resume from the snapshot.
* ``torchft``: :mod:`bench.recovery_torchft`, Manager + DistributedDataParallel,
  lighthouse at ``--heartbeat_timeout_ms 1000``, ``min_replica_size=1``.

Also: ``script_restart_s``, SIGKILL of rank 1 until the restarted rank 1's
first step, for the same script run by elasticd's script mode and by
torchrun; and ``node_loss_pause_s``, the survivor's pause when a whole node
(its agent, and with it the training process) is SIGKILLed, at ``lease_ttl_s``.
Ratios: ``pause_vs_torchrun`` and ``pause_vs_torchft`` (elasticd's median
pause over the baseline's: below 1 is better).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from elasticd.local_processes import free_port

HERE = Path(__file__).resolve().parent
MLP_TASK = str(HERE / "allreduce.py")
SCRIPT = str(HERE / "snapshot_mlp.py")
BACK_STEPS = 5  # the replaced worker's steps that end a failure's window
STEADY_STEPS = 20  # steps both workers take between two kills


# -- reading step times ----------------------------------------------------------------------


def _log_time(line: str) -> float:
    stamp = line[:23]  # "2026-12-02 00:18:23,159", as elasticd.serving logs it
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def elasticd_steps(path: Path) -> list[tuple[float, int]]:
    """(time, step) of every step an allreduce worker logged."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if "event=step " in line:
            m = re.search(r" step=(\d+) ", line)
            if m:
                out.append((_log_time(line), int(m.group(1))))
    return out


def script_steps(path: Path, rank: int) -> list[tuple[float, int]]:
    """(time, step) of every step of ``rank`` that bench.snapshot_mlp printed to ``path``."""
    out = []
    if not path.exists():
        return out
    pattern = re.compile(rf"t=([\d.]+) rank={rank} step=(\d+)")
    for line in path.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if m:
            out.append((float(m.group(1)), int(m.group(2))))
    return out


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest gap between consecutive times in [start, end] (end counts as a step)."""
    window = sorted(t for t in times if start <= t <= end)
    if not window:
        return end - start
    points = [start, *window] if window[0] - start > 0 else window
    return max(b - a for a, b in zip(points, points[1:], strict=False)) if len(points) > 1 else 0.0


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _after(steps: list[tuple[float, int]], since: float) -> list[tuple[float, int]]:
    return [s for s in steps if s[0] > since]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


# -- elasticd -----------------------------------------------------------------------------------


def _mlp_spec(kills: int) -> str:
    return f"""
name: recovery
mode: allreduce
task: {MLP_TASK}
steps: 100000000
batch_size: 32
workers: {{min: 1, max: 2}}
optimizer: {{name: sgd, lr: 0.001}}
max_restarts: {kills * 3 + 5}
report_every_steps: 1
"""


def elasticd_pauses(workdir: Path, kills: int, lease_ttl: int) -> dict:
    """Survivor pauses around SIGKILLs of a training process, then of a whole node."""
    from elasticd.client import JobClient
    from elasticd.local import LocalCluster
    from elasticd.membership import WorkerReport

    cluster = LocalCluster(
        workdir / "elasticd", lease_ttl=lease_ttl, join_window=1.0, threads_per_worker=1
    )
    with cluster as c:
        c.start(ps=0, agents=2)
        client = JobClient(etcd=c.etcd, prefix=c.prefix)
        try:
            job_id = client.submit_yaml(_mlp_spec(kills))
            logs = c.base_dir / "logs" / job_id
            survivor_log, victim_log = logs / "node-0.0.log", logs / "node-1.0.log"

            def report(wid: str) -> WorkerReport | None:
                got = c.client.get(c.keys.worker(job_id, wid))
                return WorkerReport.from_json(got.value) if got else None

            def steady(since: float) -> bool:
                return all(
                    len(_after(elasticd_steps(p), since)) >= STEADY_STEPS
                    for p in (survivor_log, victim_log)
                )

            _wait(lambda: steady(0), 300, "both workers training")
            pauses, rejoins = [], []
            for _ in range(kills):
                victim = report("node-1.0")
                killed = time.time()
                os.kill(victim.pid, signal.SIGKILL)
                back = _wait(
                    lambda killed=killed: (
                        len(s := _after(elasticd_steps(victim_log), killed)) >= BACK_STEPS and s
                    ),
                    300,
                    "the replaced worker back",
                )
                end = back[BACK_STEPS - 1][0]
                times = [t for t, _ in elasticd_steps(survivor_log)]
                pauses.append(longest_gap(times, killed - 1.0, end))
                rejoins.append(back[0][0] - killed)
                _wait(lambda end=end: steady(end), 300, "steady training again")
            node = []
            for _ in range(2):
                killed = time.time()
                c.kill("node-1", signal.SIGKILL)
                alone = _wait(
                    lambda killed=killed: (
                        len(s := _after(elasticd_steps(survivor_log), killed)) >= BACK_STEPS and s
                    ),
                    300,
                    "the survivor stepping alone",
                )
                times = [t for t, _ in elasticd_steps(survivor_log)]
                node.append(longest_gap(times, killed - 1.0, alone[BACK_STEPS - 1][0]))
                c.start_agent("node-1")
                since = time.time()
                _wait(lambda since=since: steady(since), 300, "the node back")
            return {
                "pauses": pauses,
                "rejoins": rejoins,
                "node_pauses": node,
                "step_s": _step_time(elasticd_steps(survivor_log)),
            }
        finally:
            client.close()


def _step_time(steps: list[tuple[float, int]]) -> float:
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:], strict=False)]
    return round(statistics.median(gaps), 4) if gaps else 0.0


def elasticd_script_restarts(workdir: Path, kills: int) -> list[float]:
    """elasticd script mode: SIGKILL of rank 1 until the restarted rank 1's first step."""
    from elasticd.client import JobClient
    from elasticd.local import LocalCluster

    spec = f"""
name: recovery-script
mode: script
script: {{path: {SCRIPT}, args: [--snapshot, {workdir / "script-snap.pt"}]}}
steps: 100000000
workers: {{min: 2, max: 2}}
max_restarts: {kills * 3 + 5}
"""
    cluster = LocalCluster(workdir / "script", lease_ttl=5, join_window=1.0, threads_per_worker=1)
    with cluster as c:
        c.start(ps=0, agents=2)
        client = JobClient(etcd=c.etcd, prefix=c.prefix)
        try:
            job_id = client.submit_yaml(spec)
            logs = c.base_dir / "logs" / job_id
            out = []
            since = 0.0
            for _ in range(kills):
                rank1 = _wait(lambda since=since: _rank_log(logs, 1, since), 300, "rank 1 training")
                _wait(
                    lambda rank1=rank1, since=since: (
                        len(_after(script_steps(rank1, 1), since)) >= STEADY_STEPS
                    ),
                    300,
                    "",
                )
                pid = _script_pid(c, job_id, rank1.stem)
                killed = time.time()
                os.kill(pid, signal.SIGKILL)
                first = _wait(
                    lambda killed=killed, rank1=rank1: _after(
                        script_steps(_rank_log(logs, 1, killed) or rank1, 1), killed
                    ),
                    300,
                    "the restarted rank 1's first step",
                )
                out.append(first[0][0] - killed)
                since = killed
            return out
        finally:
            client.close()


def _rank_log(logs: Path, rank: int, since: float) -> Path | None:
    """The worker log in which ``rank`` stepped after ``since``."""
    for path in sorted(logs.glob("*.log")):
        if _after(script_steps(path, rank), since):
            return path
    return None


def _script_pid(c, job_id: str, worker_id: str) -> int:
    from elasticd.membership import WorkerReport

    return WorkerReport.from_json(c.client.get(c.keys.worker(job_id, worker_id)).value).pid


# -- torchrun -----------------------------------------------------------------------------------


TORCHRUN_GIVE_UP_S = 120.0  # a restart not back by then is counted as unrecovered


def torchrun_pauses(workdir: Path, kills: int) -> dict:
    """torchrun restarting every process of the snapshotting script on each SIGKILL of rank 1.

    A restart that brings no step within TORCHRUN_GIVE_UP_S (seen here: gloo's
    connectFullMesh to a peer of the previous attempt, then torchrun hanging on
    a worker that ignores SIGTERM) is counted in ``unrecovered``, and torchrun
    is started again by hand from its snapshot, as an operator would.
    """
    log_path = workdir / "torchrun.log"
    snapshot = workdir / "torchrun-snap.pt"
    pauses, restarts, unrecovered = [], [], 0
    since = 0.0
    proc = _start_torchrun(log_path, snapshot, kills)
    try:
        for _ in range(kills):
            _wait(
                lambda since=since: (
                    len(_after(script_steps(log_path, 1), since)) >= STEADY_STEPS
                    and len(_after(script_steps(log_path, 0), since)) >= STEADY_STEPS
                ),
                300,
                "torchrun's ranks training",
            )
            killed = time.time()
            os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
            try:
                back = _wait(
                    lambda killed=killed: (
                        len(s := _after(script_steps(log_path, 1), killed)) >= BACK_STEPS and s
                    ),
                    TORCHRUN_GIVE_UP_S,
                    "torchrun's restarted rank 1",
                )
            except TimeoutError:
                unrecovered += 1
                _kill_tree(proc)
                proc = _start_torchrun(log_path, snapshot, kills)
                since = time.time()
                continue
            times = [t for t, _ in script_steps(log_path, 0)]
            pauses.append(longest_gap(times, killed - 1.0, back[BACK_STEPS - 1][0]))
            restarts.append(back[0][0] - killed)
            since = back[BACK_STEPS - 1][0]
        return {
            "pauses": pauses,
            "restarts": restarts,
            "unrecovered": unrecovered,
            "step_s": _step_time(script_steps(log_path, 0)),
        }
    finally:
        _kill_tree(proc)


def _start_torchrun(log_path: Path, snapshot: Path, kills: int) -> subprocess.Popen:
    argv = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nnodes=1",
        "--nproc-per-node=2",
        f"--max-restarts={kills * 3 + 5}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        SCRIPT,
        "--snapshot",
        str(snapshot),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it: torchrun starts its workers in
    sessions of their own, which a signal to its process group never reaches."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=10)


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker of ``rank`` that torchrun runs now."""
    import psutil

    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and SCRIPT in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise RuntimeError(f"torchrun runs no rank {rank}")


# -- the benchmark --------------------------------------------------------------------------


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench recovery")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--lease-ttl", type=int, default=5)
    p.add_argument("--skip-torchft", action="store_true", help="no torchft baseline")
    p.add_argument("--skip-script", action="store_true", help="no script-mode restarts")
    p.add_argument("--skip-goodput", action="store_true", help="no goodput runs (about 20 min)")
    p.add_argument(
        "--reports", default="bench/results", help="where the goodput runs' chaos reports stay"
    )
    args = p.parse_args(argv)
    out: dict = {"kills": args.kills, "lease_ttl_s": args.lease_ttl}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        workdir = Path(tmp)
        ours = elasticd_pauses(workdir, args.kills, args.lease_ttl)
        out["pause_s"] = _summary(ours["pauses"])
        out["rejoin_s"] = _summary(ours["rejoins"])
        out["node_loss_pause_s"] = _summary(ours["node_pauses"])
        out["step_s"] = ours["step_s"]
        base = torchrun_pauses(workdir, args.kills)
        out["torchrun_pause_s"] = _summary(base["pauses"]) if base["pauses"] else None
        out["torchrun_unrecovered"] = base["unrecovered"]
        out["torchrun_step_s"] = base["step_s"]
        if base["pauses"]:
            out["pause_vs_torchrun"] = round(
                out["pause_s"]["median"] / out["torchrun_pause_s"]["median"], 3
            )
        if not args.skip_script:
            out["script_restart_s"] = _summary(elasticd_script_restarts(workdir, args.kills))
            if base["restarts"]:
                out["torchrun_script_restart_s"] = _summary(base["restarts"])
        if not args.skip_torchft:
            from bench.recovery_torchft import measure_torchft

            ft = measure_torchft(kills=args.kills, workdir=str(workdir / "torchft"))
            out["torchft_pause_s"] = _summary(ft["pause_s"])
            out["torchft_step_s"] = ft["step_s"]
            out["pause_vs_torchft"] = round(
                out["pause_s"]["median"] / out["torchft_pause_s"]["median"], 3
            )
    if not args.skip_goodput:
        from bench.goodput import both

        out.update(both(Path(args.reports)))
    out["cpus"] = os.cpu_count()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out
