"""Tensors on the wire: raw bytes with a dtype and shape, in chunks.

Nothing is ever pickled. A tensor is described by a (key, dtype, shape) header
and travels as its raw little-endian bytes, cut into chunks of at most
``CHUNK_BYTES`` so that no gRPC message comes near the size limit. The
receiver checks every chunk against the header: bytes out of order, past the
end, or missing at the end are errors, never silently accepted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

CHUNK_BYTES = 1 << 20  # 1 MiB: 1, 2 and 4 MiB measured alike in bench/ps.py (frames)

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


class WireError(ValueError):
    """Bytes that do not match their header."""


@dataclass(frozen=True)
class TensorHeader:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise WireError(f"tensor {self.key!r}: unknown dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise WireError(f"tensor {self.key!r}: negative dimension in shape {self.shape}")


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


def chunk(view: memoryview, size: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
    """(offset, piece) pairs covering ``view``; one empty piece for an empty tensor."""
    if len(view) == 0:
        yield 0, view
        return
    for offset in range(0, len(view), size):
        yield offset, view[offset : offset + size]


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


# -- chunk frames ---------------------------------------------------------------------
#
# PullReply, PushRequest and InitShardRequest (proto/ps.proto) all hold a Chunk
# as field 2 of a oneof. Going through protobuf objects costs a copy of the
# data at each step (bytes(piece), message construction, serialization, and
# again parse and field access on the other side). A frame is the exact
# protobuf encoding of such a message, written in one join from the tensor's
# memory, and read back as a memoryview into the received bytes: one copy on
# each side. The bytes on the wire are ordinary protobuf, so any client that
# uses the generated classes talks to a PS that uses frames, and vice versa.

_CHUNK_FIELD = b"\x12"  # field 2, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise WireError("malformed varint in a chunk frame")


def encode_chunk_frame(index: int, offset: int, data) -> bytes:
    """The protobuf encoding of ``{chunk: {index, offset, data}}``, in one copy of ``data``."""
    head = b"\x08" + _varint(index) + b"\x10" + _varint(offset) + b"\x1a" + _varint(len(data))
    return b"".join((_CHUNK_FIELD, _varint(len(head) + len(data)), head, data))


@dataclass(frozen=True)
class ChunkFrame:
    """A received chunk: ``data`` is a view into the message's bytes (no copy)."""

    index: int
    offset: int
    data: memoryview


def decode_chunk_frame(message: bytes) -> ChunkFrame | None:
    """The chunk of a message whose only field is ``chunk``; None for anything else.

    None sends the caller to the protobuf parser, which handles every valid
    encoding (and refuses invalid ones); this reader only takes the shapes a
    chunk message has, with fields in any order and defaults left out.
    """
    buf = memoryview(message)
    end = len(buf)
    if end < 2 or buf[0] != _CHUNK_FIELD[0]:
        return None
    try:
        length, pos = _read_varint(buf, 1, end)
        if pos + length != end:
            return None
        index = offset = 0
        data = buf[pos:pos]
        while pos < end:
            tag, pos = _read_varint(buf, pos, end)
            if tag == 0x08:
                index, pos = _read_varint(buf, pos, end)
            elif tag == 0x10:
                offset, pos = _read_varint(buf, pos, end)
            elif tag == 0x1A:
                n, pos = _read_varint(buf, pos, end)
                if pos + n > end:
                    return None
                data, pos = buf[pos : pos + n], pos + n
            else:
                return None
    except WireError:
        return None
    if index >= 1 << 32:
        return None
    return ChunkFrame(index, offset, data)


def chunk_fields(message) -> tuple[int, int, bytes | memoryview] | None:
    """(index, offset, data) of a ChunkFrame or of a protobuf message holding a chunk."""
    if isinstance(message, ChunkFrame):
        return message.index, message.offset, message.data
    if message.HasField("chunk"):
        c = message.chunk
        return c.index, c.offset, c.data
    return None


def frame_serializer(message) -> bytes:
    """gRPC serializer for streams that carry frames (bytes) and protobuf messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def frame_deserializer(message_class):
    """gRPC deserializer: a ChunkFrame for chunk messages, else a ``message_class``."""

    def deserialize(data: bytes):
        return decode_chunk_frame(data) or message_class.FromString(data)

    return deserialize


def retain_chunk_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc's malloc reuse freed chunk buffers instead of mapping fresh pages.

    Every chunk is a short-lived buffer of about ``CHUNK_BYTES`` (gRPC's
    slices, the bytes objects of frames). glibc serves buffers that size from
    fresh ``mmap``s and unmaps them on free, or trims the heap under them, so
    each chunk costs zeroed pages and a page fault every 4 KiB: a fifth of a
    PS's CPU time in perf profiles of bench/ps.py. Below ``mmap_threshold``
    buffers come from the heap, which keeps up to ``trim_threshold`` bytes of
    freed memory for reuse. Process-wide and permanent, so only processes
    elasticd owns call it (``elasticd ps``). Returns False where it cannot
    apply (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(
        mallopt(m_trim_threshold, trim_threshold)
    )
