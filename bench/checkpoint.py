"""Checkpoint cost and PS-loss recovery, each against a baseline from the same run.

``python -m bench checkpoint [--json] [--scale 1] [--reps 3] [--lease-ttl 3] [--skip-loss]``

Two parameter servers run in their own processes (as in ``bench ps``) and hold
a model trained with Adam, so parameters and optimizer state together are
``state_mb`` (>= 100 at scale 1). A moto S3 server, started here, is the
object store. Figures:

- ``stall_s``: how long a checkpoint holds a shard's lock, i.e. how long a
  push waits (the worst PS of one checkpoint, as each PS records it:
  ``elasticd_ps_snapshot_pause_seconds``); ``memcpy_s``: cloning the same
  bytes in this process; ``stall_ratio`` = stall / memcpy.
- ``upload_mb_s``: a whole checkpoint through elasticd (every PS encodes and
  writes its shard to S3 in parallel, then the manifest is committed);
  ``raw_put_mb_s``: fsspec ``pipe`` of files of the same sizes to the same
  server, in parallel; ``upload_ratio`` = upload / raw.
- ``restore_s``: reading and verifying that checkpoint and importing it into
  the PS servers (``restore_tier``, what a restore after a PS loss does);
  ``raw_get_s``: fsspec ``cat`` of the same files in parallel;
  ``restore_ratio`` = restore / raw.
- ``ps_loss_pause_s`` (``ps.replicas: 2``) and ``ps_loss_pause_no_replica_s``:
  on a whole local cluster (etcd, controller, three PS, an agent) training a
  synchronous job, SIGKILL of a PS until the job's next applied update, seen
  on the surviving PS servers; ``lease_ttl_s`` is the cluster's lease TTL
  (a PS is known lost only when its lease expires).

Timed figures are medians of ``--reps`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.ps import start_servers, stop_all
from tests.fixtures.s3 import start_moto, stop_moto

MODEL_SHAPES = ((4608, 1024), (2304, 1024), (2304, 1024))  # 37.7 MB of float32; x3 with Adam
JOB = "bench-ck"
REGION = "us-east-1"


def _bucket(endpoint: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket="bench")
    return "s3://bench"


def _pause_sums(tier) -> dict[str, float]:
    """Each group's total snapshot lock time so far, in seconds."""
    return {g: s.snapshot_pause_seconds.sum for g, s in tier.stats().items()}


def _parallel(fn, items) -> float:
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(len(items)) as pool:
        list(pool.map(fn, items))
    return time.perf_counter() - started


def checkpoint_figures(args, workdir: Path) -> dict:
    import fsspec

    from elasticd.checkpoint import CheckpointManifest, CheckpointStore, ShardRecord
    from elasticd.jobspec import parse_spec
    from elasticd.placement import TensorSpec, place
    from elasticd.ps_client import PSTier
    from elasticd.server.controller.restore import restore_tier

    endpoint, moto = start_moto(workdir / "moto.log")
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION=REGION,
    )
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    try:
        url = _bucket(endpoint)
        addresses = start_servers(ctx, 2, None, procs, pipes)
        shapes = [(max(1, int(r * args.scale)), c) for r, c in MODEL_SHAPES]
        params = {f"layer{i}.weight": torch.randn(s) for i, s in enumerate(shapes)}
        specs = [TensorSpec(n, "float32", tuple(t.shape)) for n, t in params.items()]
        placement = place(specs, sorted(addresses))
        spec = parse_spec(
            {
                "name": "bench",
                "mode": "ps-async",
                "task": "bench.py",
                "steps": 10**9,
                "optimizer": {"name": "adam", "lr": 1e-4},
            }
        )
        tier = PSTier(JOB, 1, placement, addresses, worker_id="bench.0")
        tier.init(params, "adam", {"lr": 1e-4}, -1, 1, 0)
        tier.push({n: torch.randn_like(t) for n, t in params.items()}, tier.pull_into(params))
        state = [t.clone() for t in params.values() for _ in range(3)]  # params, exp_avg, _sq
        state_bytes = sum(t.numel() * t.element_size() for t in state)

        store = CheckpointStore(url)
        memcpy, stall, upload, put, restore, get, commit = [], [], [], [], [], [], []
        fs = fsspec.filesystem(
            "s3", client_kwargs={"endpoint_url": endpoint, "region_name": REGION}
        )
        for rep in range(args.reps + 1):
            started = time.perf_counter()
            _ = [t.clone() for t in state]
            memcpy_s = time.perf_counter() - started

            before = _pause_sums(tier)
            started = time.perf_counter()
            replies = tier.snapshot(url, rep + 1)
            manifest = CheckpointManifest(
                job_id=JOB,
                step=rep + 1,
                generation=1 + rep,
                created_at=time.time(),
                shards=tuple(
                    ShardRecord(g, r.path, r.sha256, r.size) for g, r in sorted(replies.items())
                ),
                extra={
                    "mode": "ps-async",
                    "optimizer": "adam",
                    "placement": json.loads(placement.to_json()),
                },
            )
            shards_s = time.perf_counter() - started
            store.commit(manifest)
            upload_s = time.perf_counter() - started
            after = _pause_sums(tier)
            stall_s = max(after[g] - before[g] for g in after)
            sizes = [r.size for r in replies.values()]

            blobs = [os.urandom(n) for n in sizes]
            raw_paths = [f"{url}/raw/{rep}/{i}" for i in range(len(blobs))]
            put_s = _parallel(
                lambda pb: fs.pipe(pb[0], pb[1]), list(zip(raw_paths, blobs, strict=True))
            )
            get_s = _parallel(fs.cat, raw_paths)

            started = time.perf_counter()
            restore_tier(spec, JOB, 2 + rep, 1, placement, addresses, store, manifest)
            restore_s = time.perf_counter() - started
            tier.generation = 2 + rep  # the import fenced the older generation
            if rep:  # the first run warms everything up
                memcpy.append(memcpy_s)
                stall.append(stall_s)
                upload.append(sum(sizes) / upload_s / 1e6)
                commit.append(upload_s - shards_s)
                put.append(sum(sizes) / put_s / 1e6)
                restore.append(restore_s)
                get.append(get_s)
        tier.close()
    finally:
        stop_all(procs, pipes)
        stop_moto(moto)
    med = statistics.median
    return {
        "state_mb": round(state_bytes / 1e6, 1),
        "checkpoint_mb": round(sum(sizes) / 1e6, 1),
        "stall_s": round(med(stall), 4),
        "memcpy_s": round(med(memcpy), 4),
        "stall_ratio": round(med(stall) / med(memcpy), 3),
        "upload_mb_s": round(med(upload), 1),
        "raw_put_mb_s": round(med(put), 1),
        "upload_ratio": round(med(upload) / med(put), 3),
        "upload_commit_s": round(med(commit), 3),  # of upload: the manifest's commit
        "restore_s": round(med(restore), 3),
        "raw_get_s": round(med(get), 3),
        "restore_ratio": round(med(restore) / med(get), 3),
    }


def ps_loss_pause(workdir: Path, lease_ttl: int, replicas: int) -> float:
    """SIGKILL a PS of a training job; seconds until a surviving PS applies an update again."""
    from elasticd.client import JobClient
    from elasticd.local import LocalCluster
    from elasticd.ps_control import call_each
    from elasticd.retry import wait_until
    from elasticd.rpc import ps_pb2

    spec = f"""
name: loss
mode: ps-async
task: {Path(__file__).resolve().parent.parent / "examples" / "linreg.py"}
task_args: {{in_features: 4096}}
steps: 100000000
batch_size: 16
workers: {{min: 1, max: 1}}
optimizer: {{name: sgd, lr: 0.001}}
ps: {{max_staleness: 0, replicas: {replicas}}}
checkpoint: {{every_steps: 50}}
report_every_steps: 5
"""
    cluster = LocalCluster(workdir / f"loss{replicas}", lease_ttl=lease_ttl, join_window=0.5)
    with cluster as c:
        c.start(ps=3, agents=1)
        client = JobClient(etcd=c.etcd, prefix=c.prefix)
        try:
            job_id = client.submit_yaml(spec)
            wait_until(lambda: client.get(job_id).checkpoint, 120, "a checkpoint")
            victim = "ps-0"
            survivors = {p: a for p, a in c.addresses().items() if p != victim}

            def applied() -> tuple[int, int]:
                """(newest generation, updates applied) over the survivors' primary copies."""
                replies = call_each(
                    survivors,
                    lambda stub: stub.Stats(ps_pb2.StatsRequest(job_id=job_id), timeout=2),
                )
                jobs = [
                    j
                    for r in replies.values()
                    if not isinstance(r, Exception)
                    for j in r.jobs
                    if not j.backup
                ]
                return max((j.generation for j in jobs), default=0), max(
                    (j.version for j in jobs), default=0
                )

            gen, _ = applied()
            c.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            seen = wait_until(lambda: (a := applied())[0] > gen and a, 120, "a new generation")
            wait_until(lambda: applied()[1] > seen[1], 120, "an update after the loss")
            return time.monotonic() - killed
        finally:
            client.close()


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench checkpoint")
    p.add_argument("--scale", type=float, default=1.0, help="model size factor (1: >= 100 MB)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lease-ttl", type=int, default=3)
    p.add_argument("--skip-loss", action="store_true", help="skip the two PS-loss clusters")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-ck-") as tmp:
        workdir = Path(tmp)
        out = checkpoint_figures(args, workdir)
        out["lease_ttl_s"] = args.lease_ttl
        if not args.skip_loss:
            out["ps_loss_pause_s"] = round(ps_loss_pause(workdir, args.lease_ttl, 2), 3)
            out["ps_loss_pause_no_replica_s"] = round(ps_loss_pause(workdir, args.lease_ttl, 1), 3)
    out["cpus"] = os.cpu_count()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out
