"""The torchrun baseline of ``bench recovery``: a snapshotting DDP script, as torchrun's docs teach.

The same MLP as ``bench allreduce`` (``--depth`` Linear(``--width``) layers,
32 MiB of fp32 parameters by default), DistributedDataParallel on gloo, SGD.
Rank 0 snapshots model, optimizer and step every ``--every`` steps; a
restarted script resumes from the snapshot. Every rank prints one line per
step with its wall-clock time, from which the benchmark reads pauses:

    t=<time.time()> rank=<r> step=<n> restart=<TORCHELASTIC_RESTART_COUNT>

It reads only torchrun's environment contract, so it runs unchanged under
torchrun and as an elasticd ``script`` job.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--snapshot", required=True)
    p.add_argument("--steps", type=int, default=10_000_000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    start = 0
    if os.path.exists(args.snapshot):
        snap = torch.load(args.snapshot, weights_only=True)
        model.load_state_dict(snap["model"])
        opt.load_state_dict(snap["optimizer"])
        start = int(snap["step"])
    ddp = DistributedDataParallel(model)
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(args.batch, args.width, generator=gen)
        y = torch.randn(args.batch, args.width, generator=gen)
        loss = F.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"t={time.time():.6f} rank={rank} step={step + 1} restart={restarts}", flush=True)
        if rank == 0 and (step + 1) % args.every == 0:
            tmp = args.snapshot + ".tmp"
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}
            torch.save(state, tmp)
            os.replace(tmp, args.snapshot)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
