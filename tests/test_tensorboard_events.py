"""The hand-written TensorBoard event files: TFRecord framing, CRCs, scalars, the spec option."""

from __future__ import annotations

import struct

import pytest

from elasticd.jobspec import SpecError, load_spec_yaml
from elasticd.tensorboard_events import EventWriter, crc32c, masked_crc32c, read_scalars
from tests.jobs import spec_yaml


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    assert crc32c(b"") == 0


def test_scalars_read_back_with_their_steps(tmp_path) -> None:
    writer = EventWriter(tmp_path / "run")
    writer.scalars(5, {"loss": 0.5, "workers": 2.0})
    writer.scalars(10, {"loss": 0.25, "workers": 1.0})
    assert read_scalars(writer.path) == [
        (5, "loss", 0.5), (5, "workers", 2.0), (10, "loss", 0.25), (10, "workers", 1.0),
    ]  # fmt: skip
    blob = writer.path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    assert struct.unpack("<I", blob[8:12])[0] == masked_crc32c(blob[:8])
    assert b"brain.Event:2" in blob[12 : 12 + length]  # the file version comes first


def test_a_corrupt_record_is_refused(tmp_path) -> None:
    writer = EventWriter(tmp_path)
    writer.scalars(1, {"loss": 1.0})
    blob = bytearray(writer.path.read_bytes())
    blob[-6] ^= 0xFF
    writer.path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="bad CRC"):
        read_scalars(writer.path)


def test_the_spec_option_is_a_directory(tmp_path) -> None:
    spec = load_spec_yaml(spec_yaml(tensorboard="tb"), base_dir=str(tmp_path))
    assert spec.tensorboard == str(tmp_path / "tb")
    assert load_spec_yaml(spec_yaml()).tensorboard == ""
    with pytest.raises(SpecError) as err:
        load_spec_yaml(spec_yaml(tensorboard=3, batch_size=0))
    assert any(e.startswith("tensorboard:") for e in err.value.errors)
    assert any(e.startswith("batch_size:") for e in err.value.errors)  # every error at once
