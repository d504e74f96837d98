"""TensorBoard scalars without TensorBoard: event files written by hand.

The controller writes a job's scalars (``tensorboard: DIR`` in the spec) and
must not import torch, nor pull in TensorBoard and its dependencies for four
numbers per step. An event file is a TFRecord stream of ``Event`` protobuf
messages; the few fields needed are encoded here:

- TFRecord: ``uint64 length``, ``uint32 masked_crc32c(length)``, ``data``,
  ``uint32 masked_crc32c(data)``, little-endian;
- ``Event``: ``wall_time`` (1, double), ``step`` (2, int64), ``file_version``
  (3, string), ``summary`` (5, message);
- ``Summary``: repeated ``value`` (1); ``Summary.Value``: ``tag`` (1, string),
  ``simple_value`` (2, float).

:func:`read_scalars` reads such files back (for tests and tools).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

FILE_VERSION = b"brain.Event:2"


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, scalars: dict[str, float] | None = None) -> bytes:
    """An ``Event``: the file version when ``scalars`` is None, else a summary of them."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if scalars is None:
        return out + _bytes_field(3, FILE_VERSION)
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
        for tag, v in scalars.items()
    )
    return out + _bytes_field(5, values)


def record(data: bytes) -> bytes:
    """One TFRecord holding ``data``."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventWriter:
    """Appends scalars to one event file under ``directory``; thread-safe."""

    def __init__(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(directory) / name
        self._lock = threading.Lock()
        with self._lock, open(self.path, "ab") as f:
            f.write(record(encode_event(time.time(), 0)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        data = record(encode_event(time.time(), step, values))
        with self._lock, open(self.path, "ab") as f:
            f.write(data)


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as int, the rest as bytes."""
    out, i = [], 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(data, i)
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} is not used in event files")
        out.append((number, value))
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def read_scalars(path: str | Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file; checks every CRC."""
    blob = Path(path).read_bytes()
    out, i = [], 0
    while i < len(blob):
        header = blob[i : i + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", blob[i + 8 : i + 12])
        data = blob[i + 12 : i + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[i + 12 + length : i + 16 + length])
        if crc != masked_crc32c(header) or data_crc != masked_crc32c(data):
            raise ValueError(f"{path}: bad CRC in the record at byte {i}")
        i += 16 + length
        event = dict(_fields(data))
        step = int(event.get(2, 0))
        for number, value in _fields(event.get(5, b"")):
            if number == 1:
                v = dict(_fields(value))
                out.append((step, v[1].decode(), struct.unpack("<f", v[2])[0]))
    return out
