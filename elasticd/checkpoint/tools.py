"""`elasticd checkpoint ls|verify|export`: look into checkpoints without a cluster.

Every command reads storage only (any fsspec URL or a local path) and never
unpickles: manifests are JSON, shards are safetensors.

* ``ls URL`` — URL is a job's directory (``<root>/<job_id>``) or a root: one
  line per checkpoint with step, generation, mode, size and whether every
  shard verifies;
* ``verify URL`` — one checkpoint (its directory or manifest URL, or a job
  directory for its newest): exit 0 if every shard has its recorded size and
  SHA-256, else 1 with the shard that does not;
* ``export URL --out FILE`` — the checkpoint's parameters as a plain PyTorch
  state dict (``torch.save``) that loads into the task's model with
  ``torch.load(FILE, weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import sys

import fsspec
import torch

from elasticd.checkpoint.locate import NoSuchCheckpoint, load_state, locate, split_checkpoint_url
from elasticd.checkpoint.manifest import _NAME as JOB_ID
from elasticd.checkpoint.manifest import CheckpointError, CheckpointManifest
from elasticd.checkpoint.store import CheckpointStore


def _job_stores(url: str) -> list[tuple[CheckpointStore, str]]:
    """(store, job id) for a job directory, or for every job under a root."""
    url = url.rstrip("/")
    root, _, job_id = url.rpartition("/")
    if root and JOB_ID.fullmatch(job_id) and CheckpointStore(root).list_manifests(job_id):
        return [(CheckpointStore(root), job_id)]
    fs, path = fsspec.core.url_to_fs(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    store = CheckpointStore(url)
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    return [(store, j) for j in sorted(names) if JOB_ID.fullmatch(j)]  # lost+found is no job


def rows(url: str) -> list[dict]:
    out = []
    for store, job_id in _job_stores(url):
        for m in store.list_manifests(job_id):
            out.append(
                {
                    "job_id": job_id,
                    "step": m.step,
                    "generation": m.generation,
                    "mode": m.extra.get("mode", ""),
                    "bytes": sum(s.size for s in m.shards),
                    "verified": store.verify(m),
                    "url": store.url_of(m),
                }
            )
    return out


def _one(url: str) -> tuple[CheckpointStore, CheckpointManifest]:
    """A checkpoint by its URL, or a job directory's newest verified one."""
    if split_checkpoint_url(url) is not None:
        return locate(url, "")
    root, _, job_id = url.rstrip("/").rpartition("/")
    return locate(job_id, root)


def state_dict(store: CheckpointStore, manifest: CheckpointManifest) -> dict[str, torch.Tensor]:
    """The checkpoint's parameters, whole, by parameter name."""
    params, _ = load_state(store, manifest)
    return {name: params[name].contiguous() for name in sorted(params)}


def cmd_ls(args) -> int:
    found = rows(args.url)
    if args.json:
        print(json.dumps(found))
        return 0
    if not found:
        print(f"no checkpoints under {args.url}")
        return 0
    print(f"{'job':<16} {'step':>10} {'gen':>5} {'mode':<10} {'bytes':>12}  verified")
    for r in found:
        ok = "yes" if r["verified"] else "NO (corrupt or incomplete)"
        print(
            f"{r['job_id']:<16} {r['step']:>10} {r['generation']:>5} {r['mode']:<10} "
            f"{r['bytes']:>12}  {ok}"
        )
    return 0


def cmd_verify(args) -> int:
    try:
        store, manifest = _one(args.url)
    except NoSuchCheckpoint as exc:
        print(f"elasticd checkpoint verify: {exc}", file=sys.stderr)
        return 1
    print(f"{store.url_of(manifest)}: step {manifest.step}, {len(manifest.shards)} shards verified")
    return 0


def cmd_export(args) -> int:
    try:
        store, manifest = _one(args.url)
        params = state_dict(store, manifest)
    except (NoSuchCheckpoint, CheckpointError) as exc:
        print(f"elasticd checkpoint export: {exc}", file=sys.stderr)
        return 1
    torch.save(params, args.out)
    print(f"wrote {len(params)} parameters of {store.url_of(manifest)} to {args.out}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="elasticd checkpoint",
        description="Read checkpoints in storage (a local path or any fsspec URL).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="list checkpoints under a root or a job's directory")
    ls.add_argument("url", help="<root> or <root>/<job_id>")
    ls.add_argument("--json", action="store_true", help="one JSON list")
    ls.set_defaults(func=cmd_ls)
    verify = commands.add_parser("verify", help="check every shard's size and SHA-256")
    verify.add_argument("url", help="a checkpoint (<root>/<job>/<step>) or <root>/<job_id>")
    verify.set_defaults(func=cmd_verify)
    export = commands.add_parser("export", help="write the parameters as a PyTorch state dict")
    export.add_argument("url", help="a checkpoint (<root>/<job>/<step>) or <root>/<job_id>")
    export.add_argument("--out", required=True, help="file to write (torch.save)")
    export.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    return args.func(args)
