"""Gradient codecs by name, without torch: what a job spec's ``ps.compression`` may say.

The controller and the CLI check a spec's codec here; :mod:`elasticd.compression`
builds the codec itself (torch) on the workers and the PS.
"""

from __future__ import annotations

DEFAULT_TOPK_RATIO = 0.01
DEFAULT_QSGD_LEVELS = 127
NAMES = ("none", "fp16", "bf16", "topk", "qsgd")
_TAKES_ARGUMENT = {"topk", "qsgd"}


class CompressionError(ValueError):
    """An unknown codec name, or a compressed payload that does not decode."""


def _ratio(arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise CompressionError(f"topk ratio must be a number, got {arg!r}") from None


def _levels(arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise CompressionError(f"qsgd levels must be an integer, got {arg!r}") from None


def parse_codec(spec: str) -> tuple[str, float | int | None]:
    """(name, argument) of ``spec`` ("none", "fp16", "topk:0.05", ...; "" is "none"):
    a topk ratio in (0, 1], a number of qsgd levels in [1, 127], else None."""
    name, sep, arg = (spec or "none").partition(":")
    if name not in NAMES:
        raise CompressionError(
            f"unknown compression {spec!r} (known: {', '.join(NAMES)}; "
            "topk and qsgd take an optional ':<ratio>' or ':<levels>')"
        )
    if sep and name not in _TAKES_ARGUMENT:
        raise CompressionError(f"compression {name!r} takes no argument, got {spec!r}")
    if name == "topk":
        ratio = _ratio(arg) if sep else DEFAULT_TOPK_RATIO
        if not 0 < ratio <= 1:
            raise CompressionError(f"topk ratio must be in (0, 1], got {ratio}")
        return name, ratio
    if name == "qsgd":
        levels = _levels(arg) if sep else DEFAULT_QSGD_LEVELS
        if not 1 <= levels <= 127:
            raise CompressionError(f"qsgd levels must be in [1, 127], got {levels}")
        return name, levels
    return name, None
