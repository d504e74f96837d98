"""A shard's whole state in and out of a PS, for switches between modes.

Export (for switches and checkpoints) encodes the parameters and the torch.optim state exactly as a
checkpoint shard (safetensors, no pickle). Import checks every tensor against
the slices the header announces before building the shard, so a malformed
import is refused and changes nothing.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from elasticd.batches import BatchSet
from elasticd.checkpoint import ShardFormatError, decode_shard, encode_shard
from elasticd.server.ps.shard import BadRequest, ParameterShard, ShardConfig
from elasticd.wire import DTYPES, TensorHeader


def export_shard(shard: ParameterShard, generation: int) -> tuple[bytes, int, BatchSet]:
    """The shard's parameters and optimizer state, encoded; its version and applied batches.

    Only a copy in memory happens under the shard's lock, so pushes wait for a
    memcpy of the shard, never for its encoding (nor, in a checkpoint, its upload).
    """
    with shard.lock:
        started = time.perf_counter()
        shard.fence(generation)
        tensors = {
            h.key: p.detach().clone() for h, p in zip(shard.headers, shard.params, strict=True)
        }
        state = _cloned(shard.optimizer.state_dict())
        version = shard.version
        last_push = dict(shard.last_push)
        applied = BatchSet(shard.applied.ranges())
        shard.stats.paused(time.perf_counter() - started)
    meta = {
        "job_id": shard.config.job_id,
        "version": version,
        "generation": generation,
        "optimizer": shard.config.optimizer,
        "keys": [h.key for h in shard.headers],
        # which pushes are in this state: a copy that takes over still knows a retried push
        "last_push": last_push,
        # which batches are in this state (exactly-once data): [[start, end), ...]
        "applied": [list(r) for r in applied.ranges()],
    }
    return encode_shard(tensors, state, meta), version, applied


def _cloned(value: Any) -> Any:
    """``value`` with every tensor in it copied (an optimizer state_dict holds live ones)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _check_state(
    state: dict[Any, dict[str, Any]], headers: list[TensorHeader]
) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for raw_index, entry in state.items():
        try:
            index = int(raw_index)
        except (TypeError, ValueError):
            raise BadRequest(f"optimizer state index {raw_index!r} is not a number") from None
        if not 0 <= index < len(headers) or not isinstance(entry, dict):
            raise BadRequest(f"optimizer state for slice #{raw_index} does not match the shard")
        h = headers[index]
        for key, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.dim() >= 1
                and tuple(value.shape) != h.shape
            ):
                raise BadRequest(
                    f"optimizer state {key!r} of {h.key!r} has shape {list(value.shape)}, "
                    f"the slice has {list(h.shape)}"
                )
        out[index] = entry
    return out


def import_shard(
    config: ShardConfig,
    generation: int,
    headers: list[TensorHeader],
    data: bytes,
    version: int,
) -> ParameterShard:
    try:
        tensors, opt_state, meta = decode_shard(data)
    except ShardFormatError as exc:
        raise BadRequest(f"import is not a valid shard document: {exc}") from None
    keys = [h.key for h in headers]
    if list(meta.get("keys", [])) != keys:
        raise BadRequest(f"import holds slices {meta.get('keys')}, the header announces {keys}")
    values = []
    for h in headers:
        t = tensors.get(h.key)
        if t is None or tuple(t.shape) != h.shape or t.dtype != DTYPES[h.dtype]:
            raise BadRequest(f"import tensor {h.key!r} does not match {h.dtype}{list(h.shape)}")
        values.append(t.clone())
    if version < 0:
        raise BadRequest(f"version {version} is negative")
    shard = ParameterShard(config, generation, headers, values)
    state = _check_state((opt_state or {}).get("state", {}), headers)
    groups = shard.optimizer.state_dict()["param_groups"]  # hyperparameters come from the job
    try:
        shard.optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BadRequest(f"optimizer state does not fit {config.optimizer}: {exc}") from None
    shard.version = version
    shard.last_push = _last_push(meta.get("last_push"))
    shard.applied = _applied(meta.get("applied"))
    return shard


def _last_push(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise BadRequest("import meta last_push must map worker ids to versions")
    return dict(value)


def _applied(value: Any) -> BatchSet:
    if value is None:
        return BatchSet()  # a shard written before batches were named
    try:
        if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) for r in value
        ):
            raise ValueError("not a list of [start, end] pairs of integers")
        return BatchSet(value)
    except ValueError as exc:
        raise BadRequest(f"import meta applied: {exc}") from None
