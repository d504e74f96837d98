"""Shard bytes: named tensors, an optimizer state_dict and metadata, without pickle.

A shard is one safetensors document. Tensors are stored under ``t/<name>``;
every tensor found inside the optimizer state or the metadata is stored under
``o/<n>`` or ``m/<n>``. Everything that is not a tensor (step counts kept as
Python numbers, hyperparameters, ``betas`` tuples, ``None``, booleans) goes
into the safetensors header metadata as one JSON document. Reading back uses
safetensors' reader and ``json``, so nothing is ever unpickled
(ARCHITECTURE.md, invariant 7).

JSON alone would lose Python types an optimizer relies on, so the non-tensor
tree is encoded with a few tags:

* ``{"__tuple__": [...]}`` for tuples (``betas``),
* ``{"__tensor__": "o/3"}`` for a tensor stored next to the header,
* ``{"__dict__": [[key, value], ...]}`` for a dict whose keys are not all plain
  strings (the optimizer's ``state`` is keyed by parameter index) or that has a
  key starting with ``__``; other dicts stay plain JSON objects.

Floats are written with Python's shortest round-trip repr (including ``NaN``
and ``Infinity``), so every hyperparameter comes back bit for bit and a loaded
optimizer continues training exactly as the saved one would have.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from elasticd.checkpoint.manifest import CheckpointError

SHARD_FORMAT = 1
"""Version of the shard header layout; bumped on incompatible changes."""

_HEADER_KEY = "elasticd.shard"
_TAGS = ("__tuple__", "__tensor__", "__dict__")


class ShardFormatError(CheckpointError, ValueError):
    """Shard bytes are not a shard this version can read."""


def encode_shard(
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    meta: dict[str, Any],
) -> bytes:
    """Serialise named tensors, an optional optimizer ``state_dict()`` and metadata.

    Tensors keep dtype and shape; they are copied to CPU. ``meta`` may hold
    anything the optimizer state may hold (numbers, strings, None, lists,
    tuples, dicts, tensors).
    """
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors must map str to torch.Tensor, got {name!r}: {type(tensor)}")
        stored[f"t/{name}"] = tensor
    header = {
        "format": SHARD_FORMAT,
        "tensors": sorted(tensors),
        "optimizer": None
        if optimizer_state is None
        else _encode(optimizer_state, "o", stored, "optimizer_state"),
        "meta": _encode(meta, "m", stored, "meta"),
    }
    metadata = {_HEADER_KEY: json.dumps(header, separators=(",", ":"))}
    return save_safetensors(_prepare(stored), metadata=metadata)


def decode_shard(
    data: bytes,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """Inverse of :func:`encode_shard`: ``(tensors, optimizer_state, meta)``."""
    header = _read_header(data)
    try:
        stored = load_safetensors(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for damaged data
        raise ShardFormatError(f"shard tensor data cannot be read: {exc}") from exc
    names = header.get("tensors")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ShardFormatError("shard header field 'tensors' must be a list of names")
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        key = f"t/{name}"
        if key not in stored:
            raise ShardFormatError(f"shard header names tensor {name!r} that is not stored")
        tensors[name] = stored[key]
    raw_optimizer = header.get("optimizer")
    optimizer_state = None if raw_optimizer is None else _decode(raw_optimizer, stored)
    meta = _decode(header.get("meta", {}), stored)
    if optimizer_state is not None and not isinstance(optimizer_state, dict):
        raise ShardFormatError("shard optimizer state must decode to a dict")
    if not isinstance(meta, dict):
        raise ShardFormatError("shard meta must decode to a dict")
    return tensors, optimizer_state, meta


def _prepare(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage, as safetensors requires."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in stored.items():
        t = tensor.detach().cpu().contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()  # a view or tied weight: store its own copy
            else:
                seen.add(ptr)
        out[key] = t
    return out


def _encode(value: Any, prefix: str, stored: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"{prefix}/{len(stored)}"  # stored only grows, so keys never repeat
        stored[key] = value
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, prefix, stored, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, prefix, stored, where) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, prefix, stored, f"{where}.{k}") for k, v in value.items()}
        items = []
        for k, v in value.items():
            if k is not None and not isinstance(k, (bool, int, float, str, tuple)):
                raise TypeError(
                    f"{where}: dict key {k!r} of type {type(k).__name__} is not storable"
                )
            items.append([_encode(k, prefix, stored, where), _encode(v, prefix, stored, where)])
        return {"__dict__": items}
    raise TypeError(f"{where}: value of type {type(value).__name__} cannot be stored in a shard")


def _decode(value: Any, stored: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, stored) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "__tuple__":
            return tuple(_decode(v, stored) for v in _expect_list(inner, tag))
        if tag == "__tensor__":
            if not isinstance(inner, str) or inner not in stored or inner.startswith("t/"):
                raise ShardFormatError(f"shard header refers to unknown tensor {inner!r}")
            return stored[inner]
        if tag == "__dict__":
            out = {}
            for item in _expect_list(inner, tag):
                if not isinstance(item, list) or len(item) != 2:
                    raise ShardFormatError("shard header '__dict__' items must be [key, value]")
                key = _decode(item[0], stored)
                if isinstance(key, (list, dict, torch.Tensor)):
                    raise ShardFormatError(f"shard header has an unhashable dict key {key!r}")
                out[key] = _decode(item[1], stored)
            return out
    if any(k in _TAGS for k in value):
        raise ShardFormatError(f"shard header has a malformed tagged value {value!r}")
    return {k: _decode(v, stored) for k, v in value.items()}


def _expect_list(value: Any, tag: str) -> list[Any]:
    if not isinstance(value, list):
        raise ShardFormatError(f"shard header {tag!r} must hold a list")
    return value


def _read_header(data: bytes) -> dict[str, Any]:
    """The elasticd header from the safetensors preamble (8-byte length + JSON)."""
    if len(data) < 8:
        raise ShardFormatError(f"shard is {len(data)} bytes, too short for a header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ShardFormatError(f"shard header length {length} exceeds the shard size")
    try:
        preamble = json.loads(bytes(data[8 : 8 + length]))
        metadata = preamble["__metadata__"]
        header = json.loads(metadata[_HEADER_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardFormatError(f"shard has no readable elasticd header: {exc!r}") from None
    if not isinstance(header, dict):
        raise ShardFormatError("shard header must be a JSON object")
    if header.get("format") != SHARD_FORMAT:
        raise ShardFormatError(
            f"unsupported shard format {header.get('format')!r}, expected {SHARD_FORMAT}"
        )
    return header


def state_digest(tensors: dict[str, torch.Tensor], state: dict, keys: list[str]) -> str:
    """sha256 of a shard's slices and optimizer state, in slice order, bit for bit.

    The same function on both ends of an import shows the shard holds exactly
    what was sent.
    """
    h = hashlib.sha256()
    for index, key in enumerate(keys):
        h.update(key.encode())
        h.update(tensors[key].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        entry = state.get(index, state.get(str(index), {}))
        for name in sorted(entry):
            value = entry[name]
            h.update(name.encode())
            if isinstance(value, torch.Tensor):
                h.update(
                    value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
            else:
                h.update(repr(value).encode())
    return h.hexdigest()
