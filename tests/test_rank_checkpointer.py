"""An allreduce rank's checkpoint writer when storage stalls (a SIGSTOPped S3 server).

A checkpoint asked for while the previous one is still being written is
skipped, never interleaved with it; the last step's checkpoint waits for the
one before it instead. Nothing half-written is left: each shard that exists
holds exactly its step's state.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from elasticd.checkpoint import CheckpointStore
from elasticd.checkpoint.serialize import decode_shard
from elasticd.retry import wait_until
from elasticd.worker.runtime.checkpointing import RankCheckpointer

JOB = "rank-ckpt"
LAST = 30


def shard_steps(url: str) -> dict[int, list[str]]:
    """step -> the shard files stored under it (listed afresh: no cache)."""
    store = CheckpointStore(url)
    fs, root = store._fs, store._root
    fs.invalidate_cache()
    out: dict[int, list[str]] = {}
    for path in fs.find(f"{root}/{JOB}"):
        step, name = path.split("/")[-2:]
        out.setdefault(int(step), []).append(name)
    return out


def test_a_checkpoint_asked_for_while_one_is_written_is_skipped_the_last_one_waits(
    private_s3, caplog
):
    url = f"{private_s3.url}/ckpt"
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    writer = RankCheckpointer(
        JOB, url, every_steps=10, last_step=LAST, optimizer="adam", reporter=None
    )
    at_step_10 = model.weight.detach().clone()

    os.kill(private_s3.proc.pid, signal.SIGSTOP)
    resumed = False
    try:
        assert writer.take(model, opt, 10, 10, rank=0, world=1, generation=1)
        with torch.no_grad():
            model.weight.add_(1.0)  # training goes on while the copy is written
        with caplog.at_level(logging.INFO):
            assert not writer.take(model, opt, 20, 20, rank=0, world=1, generation=1)
        assert "event=checkpoint_skipped job=rank-ckpt step=20" in caplog.text

        last = threading.Thread(
            target=lambda: writer.take(model, opt, LAST, LAST, rank=0, world=1, generation=1)
        )
        last.start()
        os.kill(private_s3.proc.pid, signal.SIGCONT)
        resumed = True
        last.join(120)
        assert not last.is_alive(), "the last checkpoint never started"
        writer.wait(120)
    finally:
        if not resumed:
            os.kill(private_s3.proc.pid, signal.SIGCONT)

    steps = wait_until(lambda: (s := shard_steps(url)) and set(s) == {10, LAST} and s, 30, "shards")
    assert all(len(names) == 1 for names in steps.values()), steps
    store = CheckpointStore(url)
    for step, expected in ((10, at_step_10), (LAST, model.weight.detach())):
        (name,) = steps[step]
        data = store._fs.cat_file(f"{store._root}/{JOB}/{step:012d}/{name}")
        tensors, _, meta = decode_shard(data)
        assert meta["version"] == step
        assert torch.equal(tensors["weight"], expected), f"step {step} holds another state"
