"""An ordinary torchrun-style training script, unaware of elasticd.

It reads only torchrun's environment contract (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RESTART_COUNT, ...), trains a linear model with
DistributedDataParallel on gloo, and snapshots itself every few steps so a
restart resumes where it left off — the pattern torchrun's documentation
recommends. Run it under torchrun or as an elasticd ``script`` job unchanged.

    python torchrun_script.py --snapshot /tmp/snap.pt --steps 200
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--snapshot", required=True, help="file to snapshot to and resume from")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10, help="snapshot every this many steps")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step")
    args = p.parse_args()

    dist.init_process_group("gloo")  # env:// — MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    rank, world = dist.get_rank(), dist.get_world_size()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    if os.path.exists(args.snapshot):
        snap = torch.load(args.snapshot, weights_only=True)
        model.load_state_dict(snap["model"])
        opt.load_state_dict(snap["optimizer"])
        start = int(snap["step"])
    ddp = DistributedDataParallel(model)
    print(f"rank={rank} world={world} restart_count={restarts} resume_step={start}", flush=True)

    true_w = torch.arange(8, dtype=torch.float32)
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(32, 8, generator=g)
        y = x @ true_w + 1.0
        loss = torch.nn.functional.mse_loss(ddp(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step + 1) % args.every == 0:
            tmp = args.snapshot + ".tmp"
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, tmp
            )
            os.replace(tmp, args.snapshot)
            print(f"step={step + 1} loss={loss.item():.4f}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank={rank} done at step {args.steps}", flush=True)


if __name__ == "__main__":
    main()
