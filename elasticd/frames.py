"""Bytes on the wire, without torch: tensor headers, chunks and chunk frames.

A tensor is described by a (key, dtype, shape) header and travels as its raw
little-endian bytes, cut into chunks of at most ``CHUNK_BYTES`` so that no
gRPC message comes near the size limit. This module frames and unframes those
bytes; :mod:`elasticd.wire` turns tensors into them and back. It imports no
torch, so the controller can speak to a PS (info, snapshot) without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from elasticd.dtypes import ITEMSIZE

CHUNK_BYTES = 1 << 20  # 1 MiB: 1, 2 and 4 MiB measured alike in bench/ps.py (frames)


class WireError(ValueError):
    """Bytes that do not match their header."""


@dataclass(frozen=True)
class TensorHeader:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    def validate(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise WireError(f"tensor {self.key!r}: unknown dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise WireError(f"tensor {self.key!r}: negative dimension in shape {self.shape}")


def chunk(view: memoryview, size: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
    """(offset, piece) pairs covering ``view``; one empty piece for an empty tensor."""
    if len(view) == 0:
        yield 0, view
        return
    for offset in range(0, len(view), size):
        yield offset, view[offset : offset + size]


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
