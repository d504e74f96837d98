"""Checkpoints: manifest decisions, pickle-free shards, and the store on file://, memory://, s3://.

Invariant 4 (a checkpoint exists only when its manifest exists; loaders fall back
past damaged checkpoints) and invariant 7 (nothing is unpickled from storage).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from elasticd.checkpoint import (
    CheckpointExists,
    CheckpointManifest,
    CheckpointStore,
    CorruptShard,
    ManifestError,
    ShardFormatError,
    ShardRecord,
    StaleGeneration,
    choose_checkpoint,
    decode_shard,
    encode_shard,
)
from elasticd.checkpoint.store import s3fs_exclusive_problem

JOB = "job-a"
SHA = "ab" * 32


@pytest.fixture(params=["file", "memory", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """``(url, storage_options)`` of an empty checkpoint root on each backend."""
    if request.param == "file":
        yield tmp_path.as_uri(), None
    elif request.param == "memory":
        root = f"memory://elasticd-test-{uuid.uuid4().hex}"
        yield root, None
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        url, options = request.getfixturevalue("s3_bucket")
        yield f"{url}/checkpoints", options


@pytest.fixture
def store(target: Any) -> CheckpointStore:
    return CheckpointStore(*target)


def save(
    store: CheckpointStore, step: int, generation: int = 1, payloads: dict | None = None
) -> CheckpointManifest:
    payloads = payloads or {"ps-0": f"zero@{step}".encode(), "ps-1": f"one@{step}".encode() * 50}
    shards = tuple(store.write_shard(JOB, step, name, data) for name, data in payloads.items())
    manifest = CheckpointManifest(JOB, step, generation, 1000.0 + step, shards, {"loss": 0.5})
    store.commit(manifest)
    return manifest


def shard_location(store: CheckpointStore, target: Any, manifest: CheckpointManifest, name: str):
    url = store.url_of(manifest).rsplit("/", 1)[0] + "/" + manifest.shard(name).path
    return fsspec.core.url_to_fs(url, **(target[1] or {}))


def manifest_location(store: CheckpointStore, target: Any, manifest: CheckpointManifest):
    return fsspec.core.url_to_fs(store.url_of(manifest), **(target[1] or {}))


# -- the store, on every backend ---------------------------------------------------


def test_round_trip(store: CheckpointStore, target: Any) -> None:
    weights = {"w": torch.randn(3, 4), "b": torch.arange(4, dtype=torch.int64)}
    blob = encode_shard(weights, None, {"mode": "ps-async"})
    shards = (store.write_shard(JOB, 7, "ps-0", blob), store.write_shard(JOB, 7, "ps-1", b"x"))
    extra = {"mode": "allreduce", "finished": [[0, 10], [20, 30]]}
    manifest = CheckpointManifest(JOB, 7, 3, 1234.5, shards, extra)
    url = store.commit(manifest)
    assert url == store.url_of(manifest)
    assert url.startswith(target[0].split("://")[0] + "://") and url.endswith("/MANIFEST.json")
    assert "/job-a/000000000007/" in url

    assert store.list_manifests(JOB) == [manifest]
    assert store.latest(JOB) == manifest
    assert store.latest("other-job") is None
    tensors, optimizer_state, meta = decode_shard(store.read_shard(manifest, "ps-0"))
    assert optimizer_state is None and meta == {"mode": "ps-async"}
    assert all(torch.equal(tensors[k], weights[k]) for k in weights)
    assert store.read_shard(manifest, "ps-1") == b"x"


def test_truncated_shard_falls_back_to_previous(store: CheckpointStore, target: Any) -> None:
    older, newer = save(store, 10), save(store, 20)
    assert store.latest(JOB) == newer
    fs, path = shard_location(store, target, newer, "ps-1")
    if isinstance(fs, LocalFileSystem):
        with open(path, "r+b") as f:
            f.truncate(newer.shard("ps-1").size // 2)
    else:
        fs.pipe_file(path, fs.cat_file(path)[: newer.shard("ps-1").size // 2])

    assert not store.verify(newer)
    assert store.latest(JOB) == older
    with pytest.raises(CorruptShard):
        store.read_shard(newer, "ps-1")
    assert store.read_shard(older, "ps-1") == b"one@10" * 50


def test_manifest_never_visible_without_its_shards(store: CheckpointStore, target: Any) -> None:
    written = store.write_shard(JOB, 5, "ps-0", b"data")
    gone = store.write_shard(JOB, 5, "ps-1", b"more")
    fs, path = shard_location(store, target, CheckpointManifest(JOB, 5, 1, 0.0, (gone,)), "ps-1")
    fs.rm(path)
    never_written = ShardRecord("ps-2", "ps-2.never.shard", SHA, 4)
    for shards in ((written, gone), (written, never_written)):
        manifest = CheckpointManifest(JOB, 5, 1, 0.0, shards)
        with pytest.raises(StaleGeneration, match="missing"):
            store.commit(manifest)
        fs, path = manifest_location(store, target, manifest)
        assert not fs.exists(path)
    assert store.list_manifests(JOB) == [] and store.latest(JOB) is None


def test_same_step_committed_twice_exactly_one_wins(store: CheckpointStore, target: Any) -> None:
    rival = CheckpointStore(*target)  # another process's view of the same storage
    first = save(store, 5, payloads={"ps-0": b"first"})
    second_shard = rival.write_shard(JOB, 5, "ps-0", b"second")
    second = CheckpointManifest(JOB, 5, 1, 9.0, (second_shard,), {"writer": "second"})
    with pytest.raises(CheckpointExists):
        rival.commit(second)
    fs, path = manifest_location(store, target, first)
    assert CheckpointManifest.from_json(fs.cat_file(path)) == first
    assert rival.latest(JOB) == first
    assert rival.read_shard(first, "ps-0") == b"first"


@pytest.mark.parametrize("target", ["file", "memory"], indirect=True)
def test_racing_commits_of_one_step(target: Any) -> None:
    # Not run on moto: its If-None-Match check is not atomic with the put (S3's is).
    contenders = 8
    barrier = threading.Barrier(contenders)
    outcomes: list[str] = []

    def contend(i: int) -> None:
        store = CheckpointStore(*target)
        shard = store.write_shard(JOB, 3, "ps-0", f"writer {i}".encode())
        barrier.wait(timeout=10)
        try:
            store.commit(CheckpointManifest(JOB, 3, 1, float(i), (shard,)))
            outcomes.append("won")
        except CheckpointExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["lost"] * (contenders - 1) + ["won"]
    store = CheckpointStore(*target)
    winner = store.latest(JOB)
    assert winner is not None
    assert store.read_shard(winner, "ps-0") == f"writer {int(winner.created_at)}".encode()


@pytest.mark.parametrize(
    ("version", "refused"),
    [("2024.12.0", True), ("2025.5.1", True), ("2025.7.0", False), ("2026.9.0", False)],
)
def test_an_s3fs_that_cannot_create_exclusively_is_named(version: str, refused: bool) -> None:
    # 2024.12 and 2025.5 sent no If-None-Match on a one-shot write: two commits of one
    # step both won against moto with each installed (pip installs a newer one for the suite).
    problem = s3fs_exclusive_problem(version)
    assert (problem is not None) == refused
    if refused:
        assert f"s3fs {version}" in problem and "s3fs>=2025.7" in problem


def test_stale_generation_refused_and_nothing_written(store: CheckpointStore, target: Any) -> None:
    current = save(store, 10, generation=2)
    for step in (20, 5):
        shard = store.write_shard(JOB, step, "ps-0", b"zombie")
        stale = CheckpointManifest(JOB, step, 1, 0.0, (shard,))
        with pytest.raises(StaleGeneration, match="generation 2"):
            store.commit(stale)
        fs, path = manifest_location(store, target, stale)
        assert not fs.exists(path)
    assert store.list_manifests(JOB) == [current]
    assert store.latest(JOB) == current
    newer = save(store, 30, generation=3)
    assert save(store, 40, generation=3).step == 40 and newer.step == 30


def test_malformed_manifests_are_skipped(
    store: CheckpointStore, target: Any, caplog: pytest.LogCaptureFixture
) -> None:
    good = save(store, 1)
    bad_documents = {
        2: b"{not json",
        3: good.to_json().replace(b'"step": 1', b'"step": "three"'),
        4: good.to_json(),  # a valid manifest stored under the wrong step
    }
    for step, data in bad_documents.items():
        url = store.url_of(dataclasses.replace(good, step=step))
        fs, path = fsspec.core.url_to_fs(url, **(target[1] or {}))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
    with caplog.at_level("WARNING", logger="elasticd.checkpoint.store"):
        assert store.list_manifests(JOB) == [good]
    skipped = [r.getMessage() for r in caplog.records if "manifest skipped" in r.getMessage()]
    assert len(skipped) == 3 and any("'step'" in m for m in skipped)
    assert store.latest(JOB) == good


def test_plain_local_path_creates_directories(tmp_path: Any) -> None:
    store = CheckpointStore(str(tmp_path / "not" / "yet"))
    manifest = save(store, 0)
    assert store.url_of(manifest).startswith("file://")
    assert (tmp_path / "not" / "yet" / JOB / "000000000000" / "MANIFEST.json").is_file()
    assert CheckpointStore((tmp_path / "not" / "yet").as_uri()).latest(JOB) == manifest


# -- manifests and the choice of checkpoint (pure) ---------------------------------


def manifest_at(step: int, generation: int = 1) -> CheckpointManifest:
    return CheckpointManifest(JOB, step, generation, float(step), (ShardRecord("s", "s", SHA, 1),))


def test_manifest_json_round_trip() -> None:
    manifest = dataclasses.replace(manifest_at(12, 4), extra={"loss": 0.25, "mode": "allreduce"})
    document = json.loads(manifest.to_json())
    assert document["format"] == 1
    assert CheckpointManifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("step"), "step"),
        (lambda d: d.update(step="12"), "step"),
        (lambda d: d.update(generation=-1), "generation"),
        (lambda d: d.update(format=99), "format"),
        (lambda d: d.pop("format"), "format"),
        (lambda d: d.update(job_id="../etc"), "job_id"),
        (lambda d: d.update(created_at=True), "created_at"),
        (lambda d: d.update(shards={}), "shards"),
        (lambda d: d.update(extra=[]), "extra"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["shards"][0].update(sha256="xyz"), "shards[0].sha256"),
        (lambda d: d["shards"][0].update(path="../x"), "shards[0].path"),
        (lambda d: d["shards"][0].pop("size"), "shards[0].size"),
        (lambda d: d["shards"].append(dict(d["shards"][0])), "shards[1].name"),
    ],
)
def test_from_json_names_the_bad_field(change: Any, field: str) -> None:
    document = json.loads(manifest_at(12).to_json())
    change(document)
    with pytest.raises(ManifestError) as caught:
        CheckpointManifest.from_json(json.dumps(document).encode())
    assert caught.value.field == field and repr(field) in str(caught.value)


def test_from_json_rejects_non_json() -> None:
    for data in (b"\x80\x04pickle", b"[1, 2]", b'{"step": NaN}'):
        with pytest.raises(ManifestError):
            CheckpointManifest.from_json(data)


def test_choose_checkpoint_takes_newest_that_verifies() -> None:
    manifests = [manifest_at(20), manifest_at(5), manifest_at(30), manifest_at(10)]
    tried: list[int] = []

    def verify(m: CheckpointManifest) -> bool:
        tried.append(m.step)
        return m.step not in (30, 20)

    assert choose_checkpoint(manifests, verify) == manifest_at(10)
    assert tried == [30, 20, 10]
    assert choose_checkpoint(manifests, lambda m: True) == manifest_at(30)
    assert choose_checkpoint(manifests, lambda m: False) is None
    assert choose_checkpoint([], lambda m: True) is None


# -- shard bytes --------------------------------------------------------------------


def test_tensors_keep_dtype_and_shape() -> None:
    base = torch.arange(12, dtype=torch.float32)
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "view": base[2:6],  # shares storage with "base"
        "base": base,
        "transposed": base.reshape(3, 4).t(),
    }
    meta = {"betas": (0.9, 0.999), "none": None, "flag": True, "__odd": {1: "x"}}
    decoded, optimizer_state, back = decode_shard(encode_shard(tensors, None, meta))
    assert optimizer_state is None and back == meta and isinstance(back["betas"], tuple)
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape
        assert torch.equal(decoded[name], tensor), name


def test_decode_rejects_foreign_bytes() -> None:
    for data in (b"", b"\x80\x04\x95pickle", b"\x10" + b"\x00" * 7 + b"{}" * 8):
        with pytest.raises(ShardFormatError):
            decode_shard(data)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1),
}


def train(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        optimizer.zero_grad()
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_state_continues_bitwise(kind: str) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.05}]
    optimizer = OPTIMIZERS[kind](groups)
    train(params, optimizer, seed=1)

    blob = encode_shard({"w": params[0], "b": params[1]}, optimizer.state_dict(), {"step": 3})
    tensors, state, meta = decode_shard(blob)
    clones = [torch.nn.Parameter(tensors["w"].clone()), torch.nn.Parameter(tensors["b"].clone())]
    restored = OPTIMIZERS[kind]([{"params": [clones[0]]}, {"params": [clones[1]], "lr": 0.05}])
    restored.load_state_dict(state)
    assert meta == {"step": 3}

    train(params, optimizer, seed=2)
    train(clones, restored, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(params, clones, strict=True))
    original, again = optimizer.state_dict(), restored.state_dict()
    assert original["param_groups"] == again["param_groups"]
    for index, entry in original["state"].items():
        for key, value in entry.items():
            other = again["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_prune_keeps_the_newest_and_the_newest_that_verifies(
    store: CheckpointStore, target: Any
) -> None:
    for step in (1, 2, 3, 4):
        save(store, step)
    for step in (3, 4):  # the two newest are damaged
        manifest = next(m for m in store.list_manifests(JOB) if m.step == step)
        fs, path = shard_location(store, target, manifest, "ps-0")
        fs.pipe_file(path, b"damaged")
    assert store.prune(JOB, keep=1) == [1, 3]
    assert [m.step for m in store.list_manifests(JOB)] == [2, 4]
    assert store.latest(JOB).step == 2
    assert store.prune(JOB, keep=0) == []  # 0 keeps everything
    # A writer that just committed names it as verified: nothing older is read again.
    newest = save(store, 5)
    assert store.prune(JOB, keep=1, verified=newest) == [2, 4]
    assert [m.step for m in store.list_manifests(JOB)] == [5]
