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

from elasticd.checkpoint.manifest import CheckpointError

SHARD_FORMAT = 1
"""Version of the shard header layout; bumped on incompatible changes."""

_HEADER_KEY = "elasticd.shard"
_TAGS = ("__tuple__", "__tensor__", "__dict__")
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


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
    return plan_shard(tensors, optimizer_state, meta).to_bytes()


class ShardLayout:
    """Where every tensor of a shard goes in its bytes (the safetensors layout, written here
    so that each tensor is copied once, straight into the output)."""

    def __init__(self, stored: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        self._parts: list[tuple[torch.Tensor, int, int]] = []
        offset = 0
        for key in sorted(stored):
            t = stored[key]
            if t.dtype not in _SAFETENSORS_DTYPES:
                raise TypeError(f"tensor {key!r} has dtype {t.dtype}, which a shard cannot store")
            n = t.numel() * t.element_size()
            header[key] = {
                "dtype": _SAFETENSORS_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + n],
            }
            self._parts.append((t, offset, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        self._header = raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.size = 8 + len(self._header) + offset

    def to_bytes(self) -> bytes:
        """The shard's bytes, every tensor copied once (bytes, which storage clients send
        fastest)."""
        pieces: list[Any] = [struct.pack("<Q", len(self._header)), self._header]
        pieces += [
            memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t, _, n in self._parts if n
        ]
        data = b"".join(pieces)
        assert len(data) == self.size
        return data


def plan_shard(
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    meta: dict[str, Any],
) -> ShardLayout:
    """The layout :func:`encode_shard` writes; the tensors are read only by ``fill``."""
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
    return ShardLayout({k: t.detach().cpu().contiguous() for k, t in stored.items()}, metadata)


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
        h.update(_raw(tensors[key]))
        entry = state.get(index, state.get(str(index), {}))
        for name in sorted(entry):
            value = entry[name]
            h.update(name.encode())
            if isinstance(value, torch.Tensor):
                h.update(_raw(value))
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def _raw(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes, without copying them when it is contiguous on the CPU."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
