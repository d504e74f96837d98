"""Recovery baseline: how long torchft's surviving replica pauses when its peer is SIGKILLed.

``measure_torchft(kills=5, width=1024, depth=8, batch=32, workdir=None) -> dict``

Set-up (the same job as ``bench.allreduce``, run under Meta's torchft instead):

* one ``torchft_lighthouse`` on a free loopback port, ``--min_replicas 1
  --heartbeat_timeout_ms 1000``;
* two replica groups of one process each (this file run as a script,
  ``--replica N``), each hosting its own TCPStore (what torchrun would do for a
  replica group) and training the MLP — ``depth`` Linear(width, width) layers,
  32 MiB of fp32 parameters by default, same seed — with SGD (lr 0.001) and an
  MSE loss on seeded random batches, through torchft's ``Manager``
  (``min_replica_size=1``) and ``DistributedDataParallel`` over gloo;
* every replica appends one line per *committed* step, ``step time.time()
  participants``, to its own log file.

Then, ``kills`` times: wait for steady training (both replicas committing steps
together), SIGKILL replica 1 (the victim), restart it at once as a supervisor
would, and wait until it has committed 5 steps and replica 0 (the survivor) is
committing two-replica steps again. Per kill:

* ``pause_s``: the longest gap between consecutive committed steps of the
  survivor from 1 s before the kill to the victim's 5th committed step after
  its restart. It covers both stalls the survivor sees: waiting for the
  lighthouse to declare the dead peer gone (~ the heartbeat timeout) and the
  rejoin (the newcomer fetching a checkpoint from the survivor);
* ``rejoin_s``: from the kill to the restarted victim's first committed step
  (process start, imports, quorum, checkpoint transfer included).

``step_s`` is the survivor's median time between committed two-replica steps
before the first kill.

The gloo workaround. Stock torchft 0.2.0 crashes the survivor when the peer
dies mid-allreduce on gloo: gloo's ``work.wait()`` raises, torchft's
``_ManagedWork.wait`` swallows the error and reports it to the manager (as it
should), but returns before it has built its future chain, so
``torchft.ddp.DistributedDataParallel._comm_hook`` fails on ``assert fut._fut``
and the exception escapes ``backward()``. (After the first error of a step
``Manager.allreduce`` returns a plain ``_DummyWork``, whose future has no
``_fut`` at all: same crash.) This measures torchft's recovery, not that bug,
so the replicas use a subclass of torchft's DDP whose comm hook, when the
allreduce fails, zeroes the bucket (its content may be half-reduced) and
returns it as an already-completed future, after making sure the manager has
the error recorded: ``Manager.should_commit()`` then returns False, the
optimizer step is skipped, and the next ``start_quorum()`` reconfigures the
process group without the dead peer — torchft's documented contract for a
failed allreduce. Nothing in site-packages is modified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.recovery import free_port, longest_gap

HERE = Path(__file__).resolve().parent
HEARTBEAT_TIMEOUT_MS = 1000
# Steady training: this many two-replica steps committed by each replica.
STEADY_STEPS = 10
# The victim is back once it has committed this many steps after its restart.
REJOIN_STEPS = 5
# How long a phase (start-up, steady state, rejoin) may take before we give up.
PHASE_TIMEOUT_S = 90.0
POLL_S = 0.02


def _require_torchft() -> str:
    """torchft's version, or a RuntimeError saying how to install it."""
    try:
        import torchft  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "torchft is not installed: run `pip install torchft numpy` "
            f"(with {sys.executable} -m pip) to measure the torchft recovery baseline"
        ) from exc
    from importlib.metadata import version

    return version("torchft")


def _lighthouse_binary() -> str:
    """The ``torchft_lighthouse`` executable installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "torchft_lighthouse"
    if beside.exists():
        return str(beside)
    found = shutil.which("torchft_lighthouse")
    if found is None:
        raise RuntimeError(
            "torchft_lighthouse not found: run `pip install torchft numpy` in this virtualenv"
        )
    return found


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


# --------------------------------------------------------------------------- parent side


@dataclass
class _StepLog:
    """Tails a replica's log of committed steps: (wall time, participants) per step."""

    path: Path
    steps: list[tuple[float, int]] = field(default_factory=list)
    _offset: int = 0

    def refresh(self) -> list[tuple[float, int]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return self.steps
        end = chunk.rfind(b"\n") + 1  # only complete lines
        self._offset += end
        for line in chunk[:end].decode().splitlines():
            _, stamp, participants = line.split()
            self.steps.append((float(stamp), int(participants)))
        return self.steps

    def times(self, since: float = float("-inf")) -> list[float]:
        return [t for t, _ in self.refresh() if t >= since]

    def joint_times(self, since: float = float("-inf")) -> list[float]:
        """Committed steps taken together with the other replica."""
        return [t for t, n in self.refresh() if t >= since and n >= 2]


class _Job:
    """The lighthouse and the replica processes, each in its own process group."""

    def __init__(self, workdir: Path, width: int, depth: int, batch: int) -> None:
        self.workdir, self.width, self.depth, self.batch = workdir, width, depth, batch
        self.procs: list[subprocess.Popen] = []
        self.names: dict[int, str] = {}  # pid -> name, for error messages
        self.lighthouse_url = ""

    def _spawn(
        self, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        with open(self.workdir / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: killpg reaches any children
            )
        self.procs.append(proc)
        self.names[proc.pid] = name
        return proc

    def start_lighthouse(self) -> None:
        port = free_port()
        proc = self._spawn(
            [
                _lighthouse_binary(),
                "--min_replicas", "1",
                "--heartbeat_timeout_ms", str(HEARTBEAT_TIMEOUT_MS),
                "--bind", f"127.0.0.1:{port}",
            ],
            "lighthouse",
        )  # fmt: skip
        _wait_listening(port, proc)
        self.lighthouse_url = f"http://127.0.0.1:{port}"

    def start_replica(self, replica: int, incarnation: int) -> tuple[subprocess.Popen, _StepLog]:
        name = f"replica{replica}.{incarnation}"
        log = self.workdir / f"{name}.log"
        env = dict(
            os.environ,
            TORCHFT_LIGHTHOUSE=self.lighthouse_url,
            REPLICA_GROUP_ID=str(replica),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),  # a fresh store port per incarnation
            RANK="0",
            WORLD_SIZE="1",
            OMP_NUM_THREADS="1",
        )
        argv = [
            sys.executable,
            "-P",  # keep bench/ off sys.path: its modules must not shadow anything
            str(HERE / "torchft_replica.py"),
            "--replica", str(replica),
            "--log", str(log),
            "--width", str(self.width),
            "--depth", str(self.depth),
            "--batch", str(self.batch),
        ]  # fmt: skip
        return self._spawn(argv, name, env), _StepLog(log)

    def check_alive(self, *procs: subprocess.Popen) -> None:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.names[proc.pid]} exited with {proc.returncode} "
                    f"(outputs in {self.workdir}):\n{self._tails()}"
                )

    def _tails(self, chars: int = 2000) -> str:
        outs = sorted(self.workdir.glob("*.out"), key=lambda p: p.stat().st_mtime)
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in outs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _wait_for(what: str, cond, job: _Job, *procs: subprocess.Popen) -> None:
    """Poll cond() until true, failing fast if a process died or after PHASE_TIMEOUT_S."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not cond():
        job.check_alive(*procs)
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {PHASE_TIMEOUT_S} s waiting for {what}")
        time.sleep(POLL_S)


def measure_torchft(
    kills: int = 5,
    width: int = 1024,
    depth: int = 8,
    batch: int = 32,
    workdir: str | None = None,
) -> dict:
    """Kill and restart torchft replica 1 ``kills`` times; see the module docstring.

    Returns ``{"pause_s": [per kill], "rejoin_s": [per kill], "step_s": float,
    "torchft_version": str}``. Logs and process output go to ``workdir`` (kept),
    or to a temporary directory removed afterwards.
    """
    version = _require_torchft()
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="recovery_torchft_")
    root = Path(workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    job = _Job(root, width, depth, batch)
    try:
        job.start_lighthouse()
        survivor, survivor_log = job.start_replica(0, 0)
        victim, victim_log = job.start_replica(1, 0)

        pauses: list[float] = []
        rejoins: list[float] = []
        step_s = 0.0
        since = float("-inf")  # steady state is judged on steps after the last rejoin
        for kill in range(kills):
            _wait_for(
                "steady two-replica training",
                lambda since=since, victim_log=victim_log: (
                    len(survivor_log.joint_times(since)) >= STEADY_STEPS
                    and len(victim_log.joint_times(since)) >= STEADY_STEPS
                ),
                job, survivor, victim,
            )  # fmt: skip
            if kill == 0:
                steady = survivor_log.joint_times()
                step_s = statistics.median(b - a for a, b in zip(steady, steady[1:], strict=False))

            killed_at = time.time()
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            victim, victim_log = job.start_replica(1, kill + 1)  # the supervisor restarts it

            _wait_for(
                f"replica 1 to commit {REJOIN_STEPS} steps after kill {kill + 1}",
                lambda victim_log=victim_log: len(victim_log.times()) >= REJOIN_STEPS,
                job, survivor, victim,
            )  # fmt: skip
            back_at = victim_log.times()[REJOIN_STEPS - 1]
            _wait_for(
                "the survivor to step with the restarted replica",
                lambda back_at=back_at: len(survivor_log.joint_times(back_at)) >= 1,
                job, survivor, victim,
            )  # fmt: skip

            # measured as for elasticd and torchrun (bench.recovery.longest_gap)
            pauses.append(round(longest_gap(survivor_log.times(), killed_at - 1.0, back_at), 3))
            rejoins.append(round(victim_log.times()[0] - killed_at, 3))
            since = back_at

        return {
            "pause_s": pauses,
            "rejoin_s": rejoins,
            "step_s": round(step_s, 4),
            "torchft_version": version,
        }
    finally:
        job.stop()
        if tmp is not None:
            tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    print(measure_torchft(args.kills, args.width, args.depth, args.batch, args.workdir))


if __name__ == "__main__":
    main()
