"""Tensors on the wire: raw bytes with a dtype and shape, in chunks.

Nothing is ever pickled. A tensor is described by a (key, dtype, shape) header
and travels as its raw little-endian bytes, cut into chunks of at most
``CHUNK_BYTES`` so that no gRPC message comes near the size limit. The
receiver checks every chunk against the header: bytes out of order, past the
end, or missing at the end are errors, never silently accepted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from elasticd.frames import (  # noqa: F401  (the wire's byte side, re-exported)
    CHUNK_BYTES,
    ChunkFrame,
    TensorHeader,
    WireError,
    chunk,
    chunk_fields,
    decode_chunk_frame,
    encode_chunk_frame,
    frame_deserializer,
    frame_serializer,
    retain_chunk_memory,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


# torch.frombuffer warns on read-only buffers (gRPC's bytes); elasticd only reads them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the wire") from None


def header_of(key: str, tensor: torch.Tensor) -> TensorHeader:
    return TensorHeader(key, dtype_name(tensor.dtype), tuple(tensor.shape))


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


class Assembler:
    """Fills tensors described by headers from chunks arriving in order.

    ``targets`` may name existing tensors to fill in place (a worker's own
    parameters on pull); otherwise fresh tensors are allocated.
    """

    def __init__(
        self,
        headers: Sequence[TensorHeader],
        targets: Sequence[torch.Tensor] | None = None,
    ) -> None:
        for h in headers:
            h.validate()
        self.headers = list(headers)
        if targets is None:
            targets = [torch.empty(h.shape, dtype=DTYPES[h.dtype]) for h in self.headers]
        elif len(targets) != len(self.headers):
            raise WireError(f"{len(self.headers)} headers but {len(targets)} targets")
        self.tensors = list(targets)
        # Each target's bytes: a writable memoryview for CPU tensors (a chunk lands
        # with one memcpy, no torch op, so no intra-op thread pool wakes up), else
        # a uint8 tensor view (e.g. on a GPU).
        self._flat: list[memoryview | torch.Tensor] = []
        for h, t in zip(self.headers, self.tensors, strict=True):
            if tuple(t.shape) != h.shape or t.dtype != DTYPES[h.dtype]:
                raise WireError(f"tensor {h.key!r}: header {h} does not match target")
            if not t.is_contiguous():
                raise WireError(f"tensor {h.key!r}: target is not contiguous")
            flat = t.detach().reshape(-1).view(torch.uint8)
            self._flat.append(memoryview(flat.numpy()) if flat.device.type == "cpu" else flat)
        self._received = [0] * len(self.headers)

    def add(self, index: int, offset: int, data: bytes) -> None:
        if not 0 <= index < len(self.headers):
            raise WireError(f"chunk for tensor #{index}, but only {len(self.headers)} announced")
        h = self.headers[index]
        if offset != self._received[index]:
            raise WireError(
                f"tensor {h.key!r}: chunk at byte {offset}, expected byte {self._received[index]}"
            )
        end = offset + len(data)
        if end > h.nbytes:
            raise WireError(f"tensor {h.key!r}: {end} bytes sent, shape and dtype need {h.nbytes}")
        if data:
            target = self._flat[index]
            if isinstance(target, memoryview):
                target[offset:end] = data
            else:
                target[offset:end].copy_(torch.frombuffer(data, dtype=torch.uint8))
        self._received[index] = end

    def finish(self) -> list[torch.Tensor]:
        for h, got in zip(self.headers, self._received, strict=True):
            if got != h.nbytes:
                raise WireError(f"tensor {h.key!r}: {got} bytes received, expected {h.nbytes}")
        return self.tensors
