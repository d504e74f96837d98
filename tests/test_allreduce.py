"""allreduce mode: real processes, real torch.distributed (gloo), real controller.

The worker-level tests run :class:`AllreduceWorker` in child processes fed
by their stdin exactly as an agent feeds them (JSON assignments), with the
rendezvous directory in files instead of a controller. Each child prints one
JSON line per event (group formed, step taken, collective failed) with a
hash of its parameters, so the test can compare replicas bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from elasticd.client import JobClient
from elasticd.jobspec import parse_spec
from elasticd.optimizers import build_optimizer
from elasticd.retry import wait_until
from elasticd.server.controller.rendezvous import (
    NotRankZero,
    RendezvousBoard,
    StaleGeneration,
    UnknownJob,
)
from elasticd.task import load_task
from elasticd.worker.runtime.allreduce import AllreduceConfig
from elasticd.worker.runtime.control import Assignment, AssignmentFeed
from elasticd.worker.runtime.grad_buckets import GradientBuckets
from elasticd.worker.runtime.process_group import ElasticGroup
from elasticd.worker.runtime.rendezvous import FileDirectory
from elasticd.worker.runtime.replica import LRSchedule, Ramp, choose_source
from tests.jobs import spec_yaml

pytestmark = pytest.mark.slow  # whole clusters or many processes: run first (conftest)

ROOT = Path(__file__).resolve().parents[1]


# -- the child process ------------------------------------------------------------


def params_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def child_main() -> None:
    """A training process with a file rendezvous directory; events as JSON on stdout."""
    from elasticd.serving import configure_logging
    from elasticd.worker.runtime.allreduce import AllreduceWorker
    from elasticd.worker.runtime.control import ControlChannel
    from elasticd.worker.runtime.rendezvous import FileDirectory

    torch.set_num_threads(1)
    control = ControlChannel()
    first = control.first()
    configure_logging(f"worker:{first.worker_id}")

    def observe(event: str, info: dict[str, Any]) -> None:
        model = info.pop("replica").model
        info.update(
            event=event,
            hash=params_hash(model),
            params=[x for p in model.parameters() for x in p.detach().flatten().tolist()],
        )
        print(json.dumps(info), flush=True)

    worker = AllreduceWorker(first, control, FileDirectory(sys.argv[1]), observer=observe)
    sys.exit(worker.run())


def assignment(spec: dict, generation: int, world: int, rank: int, job_id: str = "job-1") -> bytes:
    wid = f"node-{rank}.0"
    message = {
        "assignment": {
            "job_id": job_id,
            "worker_id": wid,
            "generation": generation,
            "world_size": world,
            "members": [
                {"worker_id": wid, "node_id": f"node-{rank}", "rank": rank, "local_rank": 0}
            ],
            "spec": spec,
            "placement": None,
            "ps": {},
            "controller": "127.0.0.1:1",  # only used to pick the store's address
        }
    }
    return json.dumps(message).encode() + b"\n"


class Child:
    def __init__(self, name: str, rendezvous_dir: Path, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.events: list[dict] = []
        self._lock = threading.Lock()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from tests.test_allreduce import child_main; child_main()",
                 str(rendezvous_dir)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def send(self, message: bytes) -> None:
        self.proc.stdin.write(message)
        self.proc.stdin.flush()

    def seen(self, event: str, **match) -> list[dict]:
        with self._lock:
            return [
                e
                for e in self.events
                if e["event"] == event and all(e[k] == v for k, v in match.items())
            ]

    def wait_for(self, event: str, timeout: float = 60, **match) -> dict:
        def found():
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                hits = self.seen(event, **match)
                if hits:
                    return hits[-1]
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log()}")
            hits = self.seen(event, **match)
            return hits[-1] if hits else None

        return wait_until(found, timeout, f"{self.name}: {event} {match}")

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def children(tmp_path):
    started: list[Child] = []

    def start(name: str) -> Child:
        child = Child(name, tmp_path / "rendezvous", tmp_path)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


def job_spec(**fields) -> dict:
    fields.setdefault("mode", "allreduce")
    fields.setdefault("workers", {"min": 1, "max": 2})
    allreduce = fields.pop("allreduce", None)
    spec = parse_spec(yaml.safe_load(spec_yaml(**fields))).to_dict()
    if allreduce is not None:
        spec["allreduce"] = allreduce
    return spec


# -- pure parts --------------------------------------------------------------------


def test_source_is_the_survivor_with_the_highest_step_lowest_rank_on_ties():
    assert choose_source([(0, 0), (0, 0)]) == 0  # nobody has state: rank 0
    assert choose_source([(0, 0), (1, 7)]) == 1  # a fresh rank 0 never wins over a survivor
    assert choose_source([(1, 7), (1, 8), (1, 8)]) == 1
    assert choose_source([(1, 9), (0, 50)]) == 0  # no state at "step 50" is no state


def test_learning_rate_scales_with_the_world_and_ramps_up_after_growth():
    s = LRSchedule(base_lr=0.4, reference_world=4, scale=True, warmup_steps=4)
    assert s.target(4) == 0.4 and s.target(1) == 0.1
    assert LRSchedule(0.4, 4, scale=False).target(1) == 0.4
    # Growth 1 -> 4 at step 10: ramp from 0.1 to 0.4 over 4 steps.
    ramp = s.after_change(10, 1, 4, None)
    assert ramp == Ramp(10, 0.1)
    assert [round(s.at(step, 4, ramp), 6) for step in range(10, 16)] == [
        0.175, 0.25, 0.325, 0.4, 0.4, 0.4
    ]  # fmt: skip
    # Shrinking applies at once; a fresh start (old world 0) or no warm-up never ramps.
    assert s.after_change(20, 4, 2, None) is None
    assert s.after_change(0, 0, 4, None) is None
    assert LRSchedule(0.4, 4, warmup_steps=0).after_change(10, 1, 4, None) is None


def test_allreduce_section_has_defaults_and_refuses_unknown_fields():
    assert AllreduceConfig.from_spec({}) == AllreduceConfig(True, 0, 30.0, 25.0)
    c = AllreduceConfig.from_spec({"allreduce": {"warmup_steps": 5, "collective_timeout_s": 2}})
    assert (c.warmup_steps, c.collective_timeout_s, c.scale_lr) == (5, 2, True)
    for bad in ({"warmup": 1}, {"warmup_steps": -1}, {"collective_timeout_s": 0},
                {"bucket_cap_mb": "big"}, {"scale_lr": 1}):  # fmt: skip
        with pytest.raises(ValueError, match="allreduce"):
            AllreduceConfig.from_spec({"allreduce": bad})


def test_rendezvous_board_fences_old_generations():
    sealed = {"j": 3}
    board = RendezvousBoard(sealed.get)
    assert board.lookup("j", 3) is None  # not yet published
    board.publish("j", 3, "10.0.0.1:4000", "n.0")
    assert board.lookup("j", 3) == "10.0.0.1:4000"
    board.publish("j", 3, "10.0.0.1:4001")  # a restarted rank 0 replaces it
    assert board.lookup("j", 3) == "10.0.0.1:4001"
    with pytest.raises(StaleGeneration):
        board.publish("j", 2, "10.0.0.9:1")  # older than the sealed generation
    board.publish("j", 4, "10.0.0.2:5000")  # newer than the controller's cache: accepted
    assert board.lookup("j", 4) == "10.0.0.2:5000"
    with pytest.raises(StaleGeneration):
        board.lookup("j", 3)
    with pytest.raises(UnknownJob):
        board.lookup("nope", 1)
    for address in ("no-port", ":80", "h:0", "h:http", "h:70000"):
        with pytest.raises(ValueError):
            board.publish("j", 4, address)
    assert board.lookup("j", 4) == "10.0.0.2:5000"  # refused publishes changed nothing


def test_only_rank_zero_of_the_sealed_generation_publishes():
    sealed = {"j": 3}
    board = RendezvousBoard(sealed.get, lambda job, g: "n.0" if g == 3 else None)
    board.publish("j", 3, "10.0.0.1:4000", "n.0")
    with pytest.raises(NotRankZero, match="n.1 is not rank 0 of generation 3 of job j"):
        board.publish("j", 3, "10.0.0.66:1", "n.1")
    assert board.lookup("j", 3) == "10.0.0.1:4000"  # the refused publish changed nothing
    board.publish("j", 4, "10.0.0.2:5000", "n.1")  # not sealed here yet: rank 0 unknown
    assert board.lookup("j", 4) == "10.0.0.2:5000"


class RecordingGroup(ElasticGroup):
    """A real gloo group that also notes the order buckets are launched in."""

    launched: list[int]

    def all_reduce(self, tensor, async_op=False):
        self.launched.append(tensor.data_ptr())
        return super().all_reduce(tensor, async_op)


def test_buckets_launch_in_order_and_count_unused_parameters_as_zero(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "body": torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                torch.nn.Linear(16, 4),
            ),
            "unused": torch.nn.Linear(4, 4),
        }
    )  # fmt: skip
    params = list(model.parameters())
    group = RecordingGroup(FileDirectory(tmp_path))
    group.launched = []
    first = Assignment.from_message(json.loads(assignment(job_spec(), 1, 1, 0)))
    group.form(AssignmentFeed(first, None))
    try:
        buckets = GradientBuckets(params, cap_bytes=256, first_cap_bytes=64)
        assert len(buckets.buckets) >= 4
        for step in range(2):
            x = torch.randn(5, 8)
            expected = torch.autograd.grad(model["body"](x).square().sum(), params[:-2])
            buckets.prepare(group)
            model["body"](x).square().sum().backward()
            buckets.finish()
            for p, g in zip(params[:-2], expected, strict=True):
                assert torch.equal(p.grad, g), step
            assert all(not p.grad.any() for p in params[-2:])  # no gradient: zeros
            assert group.launched == [b.buffer.data_ptr() for b in buckets.buckets]
            group.launched.clear()
    finally:
        group.close()


# -- real processes -----------------------------------------------------------------


def reference_params(spec: dict, steps: int, world: int) -> list[list[float]]:
    """One process, the same batches, the gradient averaged by hand: params after each step.

    One thread, as the workers use: a matmul summed in another order differs
    in the last bits, which Adam's normalisation blows up for tiny gradients.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_params(spec, steps, world)
    finally:
        torch.set_num_threads(threads)


def _reference_params(spec: dict, steps: int, world: int) -> list[list[float]]:
    s = parse_spec({k: v for k, v in spec.items() if k != "allreduce"})
    task = load_task(s.task, s.batch_size, s.seed, s.task_args)
    model = task.build_model()
    params = list(model.parameters())
    opt = build_optimizer(s.optimizer.name, s.optimizer.kwargs, params)
    out = []
    for step in range(steps):
        grads = []
        for rank in range(world):
            model.zero_grad(set_to_none=True)
            task.loss(model, task.batch(step * world + rank)).backward()
            grads.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in grads) / world
        opt.step()
        out.append([x for p in params for x in p.detach().flatten().tolist()])
    return out


TINY_CHARLM = {"context": 16, "d_model": 32, "n_layers": 1, "n_heads": 2, "corpus_bytes": 100_000}


def test_two_replicas_stay_bitwise_equal_and_match_a_single_process(children):
    steps = 25
    spec = job_spec(
        task="charlm.py",
        task_args=TINY_CHARLM,
        batch_size=4,
        steps=steps,
        optimizer={"name": "adam", "lr": 0.01},
        report_every_steps=5,
        allreduce={"bucket_cap_mb": 0.004},  # ~4 KiB: many buckets, launched as backward runs
    )
    ranks = [children(f"rank{r}") for r in range(2)]
    for r, child in enumerate(ranks):
        child.send(assignment(spec, generation=1, world=2, rank=r))
    for child in ranks:
        assert child.proc.wait(timeout=120) == 0, child.log()
        child._reader.join(timeout=10)

    formed = [c.seen("formed")[0] for c in ranks]
    assert [f["world_size"] for f in formed] == [2, 2]
    assert formed[0]["hash"] == formed[1]["hash"]  # fresh replicas agree before step 1
    by_step = [{e["step"]: e for e in c.seen("step")} for c in ranks]
    assert sorted(by_step[0]) == sorted(by_step[1]) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert by_step[0][step]["hash"] == by_step[1][step]["hash"], f"replicas differ at {step}"
        assert by_step[0][step]["position"] == 2 * step  # each step used batches 2s, 2s+1

    reference = reference_params(spec, steps, world=2)
    for step in range(1, steps + 1):
        got = torch.tensor(by_step[0][step]["params"])
        assert torch.allclose(got, torch.tensor(reference[step - 1]), rtol=1e-4, atol=1e-6), step
    losses = [by_step[0][s]["loss"] for s in range(1, steps + 1)]
    assert losses[-1] < losses[0]


def test_survivor_of_a_killed_peer_reforms_alone_with_its_state(children):
    spec = job_spec(
        steps=10**6,
        optimizer={"name": "adam", "lr": 0.01},
        allreduce={"collective_timeout_s": 5},
    )
    victim, survivor = children("rank0"), children("rank1")
    victim.send(assignment(spec, generation=1, world=2, rank=0))
    survivor.send(assignment(spec, generation=1, world=2, rank=1))
    survivor.wait_for("step", step=20)

    victim.proc.send_signal(signal.SIGKILL)  # rank 0 also hosted the rendezvous store
    failed = survivor.wait_for("failed")
    assert "error" in failed
    last = survivor.seen("step", generation=1)[-1]

    # What the controller would seal next: the survivor alone, now rank 0.
    survivor.send(assignment(spec, generation=2, world=1, rank=0))
    formed = survivor.wait_for("formed", generation=2)
    assert formed["world_size"] == 1 and formed["rank"] == 0 and formed["source"] == 0
    assert formed["step"] == last["step"]  # nothing lost, nothing applied twice
    assert formed["hash"] == last["hash"]  # parameters intact
    assert formed["position"] == last["position"]
    # It trains on alone, one batch per step, at the scaled rate lr * 1 / workers.max.
    after = survivor.wait_for("step", step=last["step"] + 5)
    assert after["generation"] == 2 and after["world_size"] == 1
    assert after["position"] == last["position"] + 5
    assert math.isclose(after["lr"], 0.01 / 2)
    assert survivor.proc.poll() is None  # one process all along: never restarted


def test_restarted_peer_rejoins_the_same_generation_in_a_new_round(children):
    """No new generation (e.g. the controller has not sealed one yet): a new round forms."""
    spec = job_spec(steps=10**6, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    survivor, victim = children("rank0"), children("rank1")
    survivor.send(assignment(spec, generation=1, world=2, rank=0))
    victim.send(assignment(spec, generation=1, world=2, rank=1))
    victim.wait_for("step", step=20)
    victim.proc.send_signal(signal.SIGKILL)
    survivor.wait_for("failed")
    last = survivor.seen("step")[-1]

    fresh = children("rank1-again")
    fresh.send(assignment(spec, generation=1, world=2, rank=1))  # same generation, new process
    formed = [c.wait_for("formed", round=2) for c in (survivor, fresh)]
    assert [f["source"] for f in formed] == [0, 0]  # the survivor's state, not a fresh one
    assert formed[1]["step"] == last["step"] and formed[1]["hash"] == last["hash"]
    step = last["step"] + 5
    assert survivor.wait_for("step", step=step)["hash"] == fresh.wait_for("step", step=step)["hash"]


def test_allreduce_job_completes_on_a_local_cluster(cluster):
    c = cluster(ps=0, agents=2)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(
        spec_yaml(
            mode="allreduce",
            steps=150,
            report_every_steps=10,
            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.5},
        )
    )
    status = client.wait(job_id, timeout=120, interval=0.2)
    assert status.state == "COMPLETED", status
    assert status.step == 150
    assert status.loss < status.first_loss / 10, status
    client.close()


# Far longer than any wait below: a seal that waited for it would fail the test.
LONG_JOIN_WINDOW_S = 300.0


def test_killed_workers_come_back_and_take_the_survivors_state(cluster, tmp_path):
    """A killed worker is left out of one generation and comes back, fresh, in the next.

    Neither change waits for the join window: the departure seals at once
    (nobody waits on a process that is starting), and so does the return once
    the replacement is ready, since it fills the job up to ``workers.max``; so
    does the first generation.
    """
    from tests.test_join_when_ready import GATED
    from tests.test_local_cluster import workers_of

    c = cluster(ps=0, agents=2, join_window=LONG_JOIN_WINDOW_S)
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    steps = 1000
    slow = tmp_path / "slow"
    job_id = client.submit_yaml(
        spec_yaml(
            task=GATED,
            mode="allreduce",
            steps=steps,
            report_every_steps=5,
            max_restarts=2,
            # the survivor, once it has trained alone, slows down while this file exists
            task_args={"step_delay_s": 0.01, "slow": str(slow)},
        )
    )
    first = wait_until(lambda: len((s := client.get(job_id)).workers) == 2 and s, 60, "2 workers")
    wid = next(w.worker_id for w in first.workers if w.rank == 0)  # it also hosts the store
    survivor = next(w.worker_id for w in first.workers if w.rank == 1)
    wait_until(lambda: client.get(job_id).step >= 20, 60, "training to start")
    os.kill(workers_of(c, job_id)[wid].pid, signal.SIGKILL)
    # Left out of the next generation, back in the one after, as a fresh process.
    alone = c.base_dir / "logs" / job_id / f"{survivor}.log"
    wait_until(
        lambda: f"event=state_synced job={job_id} generation=2 " in alone.read_text(),
        60,
        "the survivor to train alone",
    )
    # However slowly the replacement starts, the survivor must not finish the job first.
    slow.touch()
    wait_until(
        lambda: (s := client.get(job_id)).generation >= 3 and len(s.workers) == 2,
        120,
        f"{wid} back in a later generation",
    )
    slow.unlink()

    status = client.wait(job_id, timeout=120, interval=0.5)
    assert status.state == "COMPLETED", status
    assert status.step == steps
    assert status.loss < status.first_loss / 10, status
    # 2 workers, then 1 (the survivor alone), then 2 again.
    sealed = re.findall(
        rf"event=generation_sealed job={job_id} generation=(\d+) world=(\d+)",
        (c.base_dir / "logs" / "controller-0.log").read_text(),
    )
    worlds = [int(w) for _, w in sorted(sealed, key=lambda g: int(g[0]))]
    assert worlds[:3] == [2, 1, 2], sealed
    log = (c.base_dir / "logs" / job_id / f"{wid}.log").read_text()
    synced = [line for line in log.splitlines() if "event=state_synced" in line]
    # The fresh process had no state and took the survivor's, mid-training.
    assert any("had_state=False" in ln and " step=0 " not in ln for ln in synced), synced
    client.close()
