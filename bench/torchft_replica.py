"""One torchft replica group of one process, for :mod:`bench.recovery_torchft`.

``python -P bench/torchft_replica.py --replica N --log FILE [--width --depth --batch]``

Trains the benchmark MLP through torchft's Manager and DistributedDataParallel
until it is killed, appending ``step time.time() participants`` to ``FILE`` for
every committed step. The comm hook that keeps the survivor alive through a
failed gloo allreduce is described in :mod:`bench.recovery_torchft`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

LR = 0.001
SEED = 0


def _note(msg: str) -> None:
    """A wall-clock stamped line in the replica's output, to see where start-up time goes."""
    print(f"[recovery_torchft {time.time():.3f}] {msg}", file=sys.stderr, flush=True)


def _replica_main(args: argparse.Namespace) -> None:
    """One replica group of one process: train until killed, logging committed steps."""
    _note("process started")
    import torch

    torch.set_num_threads(1)  # 2 cores, 2 replicas
    from datetime import timedelta

    import torch.distributed as dist
    from torch import nn
    from torch.nn import functional as F
    from torchft import Manager, ProcessGroupGloo
    from torchft.ddp import DistributedDataParallel as TorchftDDP

    # No annotations: DDP checks them against the real classes, and this module's
    # `from __future__ import annotations` turns them into strings.
    def safe_comm_hook(manager, bucket):  # (Manager, dist.GradBucket) -> Future[Tensor]
        """torchft's DDP comm hook, minus its crash when the allreduce fails (module docstring)."""
        buffer = bucket.buffer()
        work = manager.allreduce(buffer)
        ok = work.wait()  # False (error recorded by the manager) if the allreduce failed
        # The completed inner future of torchft's _ManagedFuture chain, as the stock hook
        # returns it; absent when the allreduce failed or was skipped (a _DummyWork).
        inner = getattr(work.get_future(), "_fut", None)
        if ok and inner is not None and manager.errored() is None:
            return inner
        if manager.errored() is None:  # defensive: should_commit() must come out False
            manager.report_error(RuntimeError("gradient allreduce failed"))
        buffer.zero_()
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done

    class SafeDDP(TorchftDDP):
        # TorchftDDP.__init__ registers self._comm_hook, so overriding it is enough.
        _comm_hook = staticmethod(safe_comm_hook)

    # torchrun would host the replica group's TCPStore; here its only process does.
    # The Manager finds it through MASTER_ADDR/MASTER_PORT and the lighthouse through
    # TORCHFT_LIGHTHOUSE, both set by the parent.
    store = dist.TCPStore(  # noqa: F841 -- must stay alive for the Manager
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=True,
        wait_for_workers=False,
    )

    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=10)),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=1,
        replica_id=f"replica_{args.replica}",
        timeout=timedelta(seconds=20),
        hostname="127.0.0.1",
    )
    ddp = SafeDDP(manager, model)
    _note("manager and model ready")

    with open(args.log, "a", buffering=1) as log:  # line-buffered: the parent tails it
        while True:
            # Each replica draws its own batches, reproducibly per (replica, step).
            gen = torch.Generator().manual_seed(
                SEED * 1_000_003 + args.replica * 100_003 + manager.current_step()
            )
            x = torch.randn(args.batch, args.width, generator=gen)
            y = torch.randn(args.batch, args.width, generator=gen)
            # What torchft.optim.OptimizerWrapper does, spelt out so we see the commit.
            manager.start_quorum()
            optimizer.zero_grad()
            F.mse_loss(ddp(x), y).backward()
            if manager.should_commit():
                optimizer.step()
                log.write(
                    f"{manager.current_step()} {time.time():.6f} {manager.num_participants()}\n"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica", type=int, required=True)
    parser.add_argument("--log", required=True, help="file to append committed steps to")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    _replica_main(parser.parse_args())


if __name__ == "__main__":
    main()
