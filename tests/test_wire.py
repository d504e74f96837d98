"""Tensors on the wire: raw bytes in chunks, checked against their headers.

Invariant 7 (nothing is unpickled) and invariant 8 (bad bytes are an error,
never silently accepted).
"""

from __future__ import annotations

import pytest
import torch

from elasticd.dtypes import ITEMSIZE
from elasticd.wire import (
    DTYPES,
    Assembler,
    TensorHeader,
    WireError,
    as_bytes,
    chunk,
    dtype_name,
    header_of,
)

# wire.py silences this torch warning for the process; pytest resets filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64).to(dtype)


def send(
    tensors: dict[str, torch.Tensor], size: int, targets: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Headers and chunks of ``tensors`` through an Assembler, tensors interleaved."""
    headers = [header_of(k, t) for k, t in tensors.items()]
    streams = [list(chunk(as_bytes(t), size)) for t in tensors.values()]
    assembler = Assembler(headers, targets)
    # Round robin over tensors: the assembler tracks each tensor's position separately.
    longest = max(len(s) for s in streams)
    for i in range(longest):
        for index, stream in enumerate(streams):
            if i < len(stream):
                offset, piece = stream[i]
                assembler.add(index, offset, bytes(piece))
    return assembler.finish()


CASES = {
    "f32": (torch.float32, (5, 7)),
    "bf16": (torch.bfloat16, (33,)),
    "f16": (torch.float16, (3, 2, 5)),
    "i64": (torch.int64, (11,)),
    "bool": (torch.bool, (9, 3)),
    "scalar": (torch.float32, ()),
    "scalar-bf16": (torch.bfloat16, ()),
    "empty": (torch.float32, (0,)),
    "empty-2d": (torch.int64, (4, 0)),
}


def test_the_torch_free_sizes_are_torchs() -> None:
    assert ITEMSIZE == {name: dtype.itemsize for name, dtype in DTYPES.items()}


@pytest.mark.parametrize("size", [1, 3, 7, 64, 1 << 20])
def test_round_trip(size: int) -> None:
    tensors = {
        name: sample(dtype, shape, i) for i, (name, (dtype, shape)) in enumerate(CASES.items())
    }
    got = send(tensors, size)
    for (name, sent), received in zip(tensors.items(), got, strict=True):
        assert received.dtype == sent.dtype, name
        assert received.shape == sent.shape, name
        assert torch.equal(received, sent), name
        # Same bits, not merely equal values (e.g. -0.0 vs 0.0).
        assert bytes(as_bytes(received)) == bytes(as_bytes(sent)), name


def test_special_float_bits_survive() -> None:
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45], dtype=torch.float32)
    (got,) = send({"x": t}, 3)
    assert bytes(as_bytes(got)) == bytes(as_bytes(t))
    assert torch.signbit(got[3])


def test_non_contiguous_source() -> None:
    t = sample(torch.float32, (6, 4)).t()
    assert not t.is_contiguous()
    (got,) = send({"t": t}, 5)
    assert torch.equal(got, t)


def test_chunking_covers_the_view() -> None:
    view = as_bytes(torch.arange(10, dtype=torch.int32))
    pieces = list(chunk(view, 16))
    assert [(o, len(p)) for o, p in pieces] == [(0, 16), (16, 16), (32, 8)]
    assert b"".join(bytes(p) for _, p in pieces) == bytes(view)
    # An empty tensor still sends one (empty) chunk.
    assert [(o, len(p)) for o, p in chunk(as_bytes(torch.empty(0)), 16)] == [(0, 0)]


def test_as_bytes_does_not_copy_contiguous_cpu_tensors() -> None:
    t = torch.zeros(4, dtype=torch.float32)
    view = as_bytes(t)
    t[1] = 1.0
    assert bytes(view[4:8]) == bytes(as_bytes(torch.tensor([1.0])))


def test_dtype_names() -> None:
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
    with pytest.raises(WireError, match="cannot travel"):
        dtype_name(torch.complex64)


# -- filling existing tensors in place -------------------------------------------


def test_fills_targets_in_place() -> None:
    source = {"w": sample(torch.float32, (8, 3), 1), "b": sample(torch.bfloat16, (5,), 2)}
    targets = [torch.zeros(8, 3), torch.zeros(5, dtype=torch.bfloat16)]
    ptrs = [t.data_ptr() for t in targets]
    got = send(source, 4, targets)
    for g, t, p, s in zip(got, targets, ptrs, source.values(), strict=True):
        assert g is t
        assert t.data_ptr() == p
        assert torch.equal(t, s)


def test_fills_row_slices_of_a_parameter_in_place() -> None:
    # What a pull does: each PS fills its rows of the worker's own parameter.
    param = torch.zeros(10, 4)
    ptr = param.data_ptr()
    top, bottom = param[:6], param[6:]
    new = sample(torch.float32, (10, 4), 3)
    send({"w[0:6]": new[:6].clone(), "w[6:10]": new[6:].clone()}, 7, [top, bottom])
    assert param.data_ptr() == ptr
    assert torch.equal(param, new)


def test_target_mismatch_is_an_error() -> None:
    h = TensorHeader("w", "float32", (2, 3))
    with pytest.raises(WireError, match="does not match target"):
        Assembler([h], [torch.zeros(3, 2)])
    with pytest.raises(WireError, match="does not match target"):
        Assembler([h], [torch.zeros(2, 3, dtype=torch.float64)])
    with pytest.raises(WireError, match="1 headers but 2 targets"):
        Assembler([h], [torch.zeros(2, 3), torch.zeros(2, 3)])


# -- errors ------------------------------------------------------------------------


def assembler_for(t: torch.Tensor) -> tuple[Assembler, bytes]:
    return Assembler([header_of("w", t)]), bytes(as_bytes(t))


def test_out_of_order_chunk() -> None:
    a, data = assembler_for(sample(torch.float32, (4,)))
    with pytest.raises(WireError, match="chunk at byte 8, expected byte 0"):
        a.add(0, 8, data[8:])
    a.add(0, 0, data[:4])
    with pytest.raises(WireError, match="expected byte 4"):
        a.add(0, 0, data[:4])  # a repeated chunk is out of order too
    with pytest.raises(WireError, match="expected byte 4"):
        a.add(0, 8, data[8:])  # so is a gap


def test_chunk_past_the_end() -> None:
    a, data = assembler_for(sample(torch.float32, (4,)))
    with pytest.raises(WireError, match="17 bytes sent, shape and dtype need 16"):
        a.add(0, 0, data + b"\0")
    a.add(0, 0, data)
    with pytest.raises(WireError, match="need 16"):
        a.add(0, 16, b"\0")


def test_chunk_for_an_empty_tensor_must_be_empty() -> None:
    a, _ = assembler_for(torch.empty(0, 3))
    with pytest.raises(WireError, match="need 0"):
        a.add(0, 0, b"\0\0\0\0")
    a.add(0, 0, b"")
    assert a.finish()[0].shape == (0, 3)


def test_missing_bytes_at_finish() -> None:
    a, data = assembler_for(sample(torch.float32, (4,)))
    a.add(0, 0, data[:12])
    with pytest.raises(WireError, match="12 bytes received, expected 16"):
        a.finish()
    b, _ = assembler_for(sample(torch.int64, ()))
    with pytest.raises(WireError, match="0 bytes received, expected 8"):
        b.finish()


def test_chunk_for_unknown_tensor_index() -> None:
    a, data = assembler_for(sample(torch.float32, (4,)))
    with pytest.raises(WireError, match="chunk for tensor #1, but only 1 announced"):
        a.add(1, 0, data)
    with pytest.raises(WireError, match="#-1"):
        a.add(-1, 0, data)


def test_unknown_dtype_in_header() -> None:
    with pytest.raises(WireError, match="unknown dtype 'complex32'"):
        Assembler([TensorHeader("w", "float32", (2,)), TensorHeader("z", "complex32", (2,))])
    with pytest.raises(WireError, match="unknown dtype"):
        Assembler([TensorHeader("w", "torch.float32", (2,))])


def test_negative_dimension_in_header() -> None:
    with pytest.raises(WireError, match="negative dimension"):
        Assembler([TensorHeader("w", "float32", (2, -1))])


def test_failed_chunk_leaves_assembler_usable() -> None:
    a, data = assembler_for(sample(torch.float32, (4,)))
    a.add(0, 0, data[:8])
    with pytest.raises(WireError):
        a.add(0, 4, data[4:])
    a.add(0, 8, data[8:])
    (got,) = a.finish()
    assert bytes(as_bytes(got)) == data
