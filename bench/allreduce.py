"""allreduce mode against plain torch DDP: training steps per second, same everything.

``python -m bench allreduce [--json] [--workers 2] [--width 1024] [--depth 8]
[--batch 32] [--warmup 5] [--steps 20] [--repeats 8]``

Two worker processes (``--workers``), each with ``torch.set_num_threads(1)``,
train the same MLP (``depth`` Linear(width, width) layers: 32 MiB of fp32
parameters by default) on the same fixed-size batches with the same SGD
optimizer, in alternating blocks of ``warmup + steps`` steps:

* ``elasticd``: :class:`~elasticd.worker.runtime.allreduce.AllreduceWorker`
  itself — rendezvous through a file directory, state sync, the per-step
  control all-reduce, gradients all-reduced in buckets from hooks, the
  elastic learning rate;
* ``ddp``: ``DistributedDataParallel`` over gloo: zero_grad, forward,
  backward, step.

Both variants run in the *same* two processes, one block after the other,
``repeats`` times, so background load on these shared machines hits both
alike. A block's rate is rank 0's steps per second after its warm-up steps.
``ratio`` is the median over the repeats of (elasticd block / the DDP block
right after it): neighbouring blocks see the same load, so the pairing
cancels most of the drift. ``elasticd_steps_per_s`` and ``ddp_steps_per_s``
are each variant's best block (its least disturbed one); their ratio and the
ratio of the medians are reported beside.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
import traceback
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

LR = 0.001


class MLPTask:
    """The benchmark's task (the task contract of elasticd.task)."""

    def __init__(self, batch_size: int, seed: int, width: int, depth: int) -> None:
        self.batch_size, self.seed, self.width, self.depth = batch_size, seed, width, depth

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layers: list[nn.Module] = []
            for _ in range(self.depth):
                layers += [nn.Linear(self.width, self.width), nn.ReLU()]
            return nn.Sequential(*layers[:-1])

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(self.batch_size, self.width, generator=gen)
        return x, torch.randn(self.batch_size, self.width, generator=gen)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)


def make_task(batch_size: int, seed: int, width: int = 1024, depth: int = 8) -> MLPTask:
    return MLPTask(batch_size, seed, width, depth)


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    from elasticd.jobspec import parse_spec

    return parse_spec(
        {
            "name": "bench",
            "mode": "allreduce",
            "task": __name__,
            "steps": args.warmup + args.steps,
            "batch_size": args.batch,
            "task_args": {"width": args.width, "depth": args.depth},
            "workers": {"min": args.workers, "max": args.workers},
            "optimizer": {"name": "sgd", "lr": LR},
            "report_every_steps": 10**6,
        }
    ).to_dict()


def _rate(times: list[float], warmup: int) -> float:
    timed = times[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def _elasticd_block(rank: int, world: int, rendezvous: str, spec: dict, block: int) -> list[float]:
    from elasticd.worker.runtime.allreduce import AllreduceWorker
    from elasticd.worker.runtime.control import Assignment
    from elasticd.worker.runtime.rendezvous import FileDirectory

    first = Assignment(
        job_id="bench",
        worker_id=f"bench.{rank}",
        generation=block + 1,  # a fresh rendezvous per block
        world_size=world,
        rank=rank,
        local_rank=0,
        spec=spec,
        placement=None,
        ps={},
        controller="127.0.0.1:1",  # picks the loopback address for the store
    )
    times: list[float] = []

    def observe(event: str, _info: dict) -> None:
        if event == "step":
            times.append(time.perf_counter())

    code = AllreduceWorker(first, None, FileDirectory(rendezvous), observer=observe).run()
    if code != 0:
        raise RuntimeError(f"elasticd worker {rank} exited {code}")
    return times


def _ddp_block(rank: int, world: int, store, spec: dict, block: int) -> list[float]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from elasticd.optimizers import build_optimizer

    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"ddp{block}", store), rank=rank, world_size=world
    )
    task = make_task(spec["batch_size"], spec["seed"], **spec["task_args"])
    model = DistributedDataParallel(task.build_model())
    opt = build_optimizer("sgd", {"lr": LR}, model.parameters())
    times: list[float] = []
    for step in range(spec["steps"]):
        opt.zero_grad(set_to_none=True)
        task.loss(model, task.batch(step * world + rank)).backward()
        opt.step()
        times.append(time.perf_counter())
    dist.destroy_process_group()
    return times


def _worker(rank: int, world: int, port: int, rendezvous: str, spec: dict, args, out) -> None:
    """Alternate blocks of elasticd and DDP steps in the same processes."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, wait_for_workers=False)
        rates: dict[str, list[float]] = {"elasticd": [], "ddp": []}
        for block in range(args.repeats):
            times = _elasticd_block(rank, world, rendezvous, spec, block)
            rates["elasticd"].append(_rate(times, args.warmup))
            times = _ddp_block(rank, world, store, spec, block)
            rates["ddp"].append(_rate(times, args.warmup))
    except BaseException:
        out.put((rank, traceback.format_exc()))
        raise
    out.put((rank, rates))
    store.add("done", 1)
    while rank == 0 and store.add("done", 0) < world:  # rank 0 hosts the store: leave last
        time.sleep(0.05)


def run(argv: list[str]) -> dict[str, Any]:
    from elasticd.local import free_port

    parser = argparse.ArgumentParser(prog="python -m bench allreduce")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="samples per worker per step")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per block")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=8, help="blocks of each variant")
    args = parser.parse_args(argv)
    spec = _spec(args)
    model = make_task(args.batch, 0, args.width, args.depth).build_model()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-allreduce-") as rendezvous:
        port = free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, args.workers, port, rendezvous, spec, args, out))
            for r in range(args.workers)
        ]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in procs:
                rank, got = out.get(timeout=3600)
                if isinstance(got, str):
                    raise RuntimeError(f"benchmark worker {rank} failed:\n{got}")
                results[rank] = got
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    runs = results[0]  # rank 0's clock; the ranks step in lockstep
    best = {name: max(rates) for name, rates in runs.items()}
    median = {name: statistics.median(rates) for name, rates in runs.items()}
    pairs = (runs["elasticd"], runs["ddp"])  # block i of each ran back to back
    return {
        "workers": args.workers,
        "model_mb": round(model_bytes / 2**20, 1),
        "batch_size": args.batch,
        "timed_steps": args.steps,
        "elasticd_steps_per_s": round(best["elasticd"], 3),
        "ddp_steps_per_s": round(best["ddp"], 3),
        "ratio": round(statistics.median(e / d for e, d in zip(*pairs, strict=True)), 3),
        "ratio_of_best": round(best["elasticd"] / best["ddp"], 3),
        "ratio_of_medians": round(median["elasticd"] / median["ddp"], 3),
        "elasticd_blocks": [round(r, 3) for r in runs["elasticd"]],
        "ddp_blocks": [round(r, 3) for r in runs["ddp"]],
    }
