"""Gradient compression on push: a registry of codecs, found by name from the job spec.

A codec turns one dense gradient into a few *parts*, each an ordinary tensor
that travels like any other (raw bytes with a key, dtype and shape; never
pickle), and turns the parts back into a dense gradient of the shard's dtype
on the parameter server. The PS checks every part's key, dtype and shape
against what the codec allows for the shard's tensor before it reads a byte,
and checks the values (indices in range, finite scales) before it decodes, so
a malformed compressed push is refused like any other malformed push.

Names (``ps.compression`` in the job spec; the parameter after ``:`` is optional):

- ``none``: the dense gradient.
- ``fp16``, ``bf16``: the gradient cast to half precision (2 bytes a value).
  fp16 values are clamped to its finite range (+-65504) first, so a large
  gradient cannot turn into an infinity on the PS.
- ``topk[:RATIO]``: the ``ceil(RATIO * n)`` entries of largest magnitude as
  (int32 index, value) pairs; RATIO defaults to 0.01. The worker keeps what it
  did not send (error feedback) and adds it to its next gradient, so every
  coordinate is eventually applied. A coordinate that waits long arrives as
  one large step: at very low ratios lower the learning rate (linreg with 64
  features and SGD lr 0.1 diverged at 1% and trained at 10%).
- ``qsgd[:LEVELS]``: QSGD-style stochastic quantization. Each value becomes a
  signed integer level in ``[-LEVELS, LEVELS]`` (int8, so LEVELS <= 127;
  default 127), rounded up or down at random with the probabilities that make
  the quantized gradient unbiased, times one float32 scale per tensor
  (``max|g| / LEVELS``: the max-norm scaling of the QSGD paper's experiments,
  which has much lower variance than the L2 norm on large tensors).

Error feedback is generic (:class:`GradientEncoder`): the residual is the
gradient minus what the PS will decode, so it applies to any codec that sets
``error_feedback``. It is kept on the worker, per tensor slice, and is updated
only once the PS has applied the push, so a refused push changes nothing on
either side.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from elasticd.codec_names import (  # noqa: F401  (re-exported)
    DEFAULT_QSGD_LEVELS,
    DEFAULT_TOPK_RATIO,
    CompressionError,
    parse_codec,
)
from elasticd.wire import DTYPES, TensorHeader, dtype_name

FP16_MAX = 65504.0


class Codec(ABC):
    """Encodes a dense gradient into parts and back. Stateless; see GradientEncoder."""

    name: str
    suffixes: tuple[str, ...]  # one part per suffix, keyed "<tensor key>#<suffix>"
    passthrough = False  # the dense gradient itself: pushed without a payload list
    error_feedback = False

    @abstractmethod
    def encode(self, grad: torch.Tensor) -> list[torch.Tensor]:
        """The parts of ``grad`` (contiguous CPU tensors), in ``suffixes`` order."""

    @abstractmethod
    def check(self, target: TensorHeader, parts: Sequence[TensorHeader]) -> None:
        """Raise CompressionError unless ``parts`` may encode a gradient of ``target``."""

    @abstractmethod
    def decode(self, target: TensorHeader, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The dense gradient (``target``'s dtype and shape); raises on bad values."""

    def part_headers(self, key: str, parts: Sequence[torch.Tensor]) -> list[TensorHeader]:
        return [
            TensorHeader(f"{key}#{s}", dtype_name(p.dtype), tuple(p.shape))
            for s, p in zip(self.suffixes, parts, strict=True)
        ]

    def _check_keys(self, target: TensorHeader, parts: Sequence[TensorHeader]) -> None:
        want = [f"{target.key}#{s}" for s in self.suffixes]
        got = [p.key for p in parts]
        if got != want:
            raise CompressionError(
                f"{self.name} payload of {target.key!r}: parts {got}, expected {want}"
            )
        if not DTYPES[target.dtype].is_floating_point:
            raise CompressionError(
                f"{self.name} compresses floating-point gradients; {target.key!r} is {target.dtype}"
            )


class Dense(Codec):
    name = "none"
    suffixes = ("dense",)
    passthrough = True

    def encode(self, grad: torch.Tensor) -> list[torch.Tensor]:
        return [grad.detach().cpu().contiguous()]

    def check(self, target: TensorHeader, parts: Sequence[TensorHeader]) -> None:
        self._check_keys(target, parts)
        if (parts[0].dtype, parts[0].shape) != (target.dtype, target.shape):
            raise CompressionError(f"dense gradient of {target.key!r} must be {target}")

    def decode(self, target: TensorHeader, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return parts[0]


class Cast(Codec):
    """The gradient in a narrower floating-point dtype."""

    suffixes = ("cast",)

    def __init__(self, name: str, dtype: torch.dtype, clamp: float | None = None) -> None:
        self.name = name
        self.dtype = dtype
        self.clamp = clamp

    def encode(self, grad: torch.Tensor) -> list[torch.Tensor]:
        g = grad.detach().cpu()
        if self.clamp is not None:
            g = g.clamp(-self.clamp, self.clamp)
        return [g.to(self.dtype).contiguous()]

    def check(self, target: TensorHeader, parts: Sequence[TensorHeader]) -> None:
        self._check_keys(target, parts)
        (p,) = parts
        if p.dtype != dtype_name(self.dtype) or p.shape != target.shape:
            raise CompressionError(
                f"{self.name} part {p.key!r} is {p.dtype}{list(p.shape)}, expected "
                f"{dtype_name(self.dtype)}{list(target.shape)}"
            )

    def decode(self, target: TensorHeader, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return parts[0].to(DTYPES[target.dtype])


class TopK(Codec):
    """The k entries of largest magnitude, as flat indices and values."""

    suffixes = ("indices", "values")
    error_feedback = True

    def __init__(self, ratio: float = DEFAULT_TOPK_RATIO) -> None:
        if not 0 < ratio <= 1:
            raise CompressionError(f"topk ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.name = f"topk:{ratio:g}"

    def k(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def encode(self, grad: torch.Tensor) -> list[torch.Tensor]:
        flat = grad.detach().cpu().reshape(-1)
        k = self.k(flat.numel())
        index = (
            flat.abs().topk(k, sorted=False).indices if k else flat.new_zeros(0, dtype=torch.long)
        )
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return [index.to(index_dtype).contiguous(), flat[index].contiguous()]

    def check(self, target: TensorHeader, parts: Sequence[TensorHeader]) -> None:
        self._check_keys(target, parts)
        index, values = parts
        numel = math.prod(target.shape)
        if index.dtype not in ("int32", "int64") or len(index.shape) != 1:
            raise CompressionError(f"{index.key!r} must be 1-d int32 or int64 indices")
        if values.dtype != target.dtype or values.shape != index.shape:
            raise CompressionError(
                f"{values.key!r} must be {target.dtype}{list(index.shape)} like its indices, "
                f"got {values.dtype}{list(values.shape)}"
            )
        if index.shape[0] > numel:
            raise CompressionError(
                f"{index.key!r}: {index.shape[0]} entries for a tensor of {numel} elements"
            )

    def decode(self, target: TensorHeader, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        index, values = parts
        numel = math.prod(target.shape)
        index = index.to(torch.long)
        if index.numel():
            if int(index.min()) < 0 or int(index.max()) >= numel:
                raise CompressionError(f"{target.key!r}: top-k index out of range [0, {numel})")
            if torch.unique(index).numel() != index.numel():
                raise CompressionError(f"{target.key!r}: top-k indices repeat")
        dense = torch.zeros(numel, dtype=DTYPES[target.dtype])
        dense[index] = values
        return dense.reshape(target.shape)


class QSGD(Codec):
    """Unbiased stochastic quantization to signed int8 levels times one scale."""

    suffixes = ("scale", "levels")

    def __init__(self, levels: int = DEFAULT_QSGD_LEVELS, seed: int = 0) -> None:
        if not 1 <= levels <= 127:
            raise CompressionError(f"qsgd levels must be in [1, 127], got {levels}")
        self.levels = levels
        self.name = f"qsgd:{levels}"
        # A private generator: quantizing never moves the training's own RNG.
        self.generator = torch.Generator().manual_seed(seed)

    def encode(self, grad: torch.Tensor) -> list[torch.Tensor]:
        g = grad.detach().cpu().float()
        top = float(g.abs().max()) if g.numel() else 0.0
        if top == 0.0 or not math.isfinite(top):
            # Nothing to send, or nothing sensible: a NaN/inf gradient decodes to zero.
            return [torch.tensor(0.0), torch.zeros(g.shape, dtype=torch.int8)]
        r = g.abs().mul_(self.levels / top)
        low = r.floor()
        up = torch.rand(g.shape, generator=self.generator) < (r - low)
        level = (low + up).mul_(g.sign()).to(torch.int8)
        return [torch.tensor(top / self.levels, dtype=torch.float32), level.contiguous()]

    def check(self, target: TensorHeader, parts: Sequence[TensorHeader]) -> None:
        self._check_keys(target, parts)
        scale, level = parts
        if scale.dtype != "float32" or scale.shape != ():
            raise CompressionError(f"{scale.key!r} must be a float32 scalar")
        if level.dtype != "int8" or level.shape != target.shape:
            raise CompressionError(
                f"{level.key!r} must be int8{list(target.shape)}, got {level.dtype}{list(level.shape)}"
            )

    def decode(self, target: TensorHeader, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        scale, level = parts
        s = float(scale)
        if not math.isfinite(s) or s < 0:
            raise CompressionError(f"{target.key!r}: qsgd scale {s} is not a finite number >= 0")
        return level.to(DTYPES[target.dtype]).mul_(s)


# name -> factory(argument, seed); the names and arguments are checked by parse_codec
CODECS: dict[str, Callable[[float | int | None, int], Codec]] = {
    "none": lambda arg, seed: Dense(),
    "fp16": lambda arg, seed: Cast("fp16", torch.float16, clamp=FP16_MAX),
    "bf16": lambda arg, seed: Cast("bf16", torch.bfloat16),
    "topk": lambda arg, seed: TopK(arg),
    "qsgd": lambda arg, seed: QSGD(arg, seed),
}


def codec_for(spec: str, seed: int = 0) -> Codec:
    """The codec named by ``spec`` ("none", "fp16", "topk:0.05", ...; "" is "none")."""
    name, arg = parse_codec(spec)
    return CODECS[name](arg, seed)


def check_payload(
    codec: Codec, targets: Sequence[TensorHeader], payload: Sequence[TensorHeader]
) -> None:
    """Raise unless ``payload`` lists each target's parts, in order, as the codec allows."""
    m = len(codec.suffixes)
    if len(payload) != m * len(targets):
        raise CompressionError(
            f"{codec.name} payload lists {len(payload)} parts; the shard's {len(targets)} "
            f"tensors need {m} each"
        )
    for i, target in enumerate(targets):
        codec.check(target, payload[i * m : (i + 1) * m])


def decode_payload(
    codec: Codec, targets: Sequence[TensorHeader], parts: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    m = len(codec.suffixes)
    return [codec.decode(t, parts[i * m : (i + 1) * m]) for i, t in enumerate(targets)]


class GradientEncoder:
    """Worker side of one codec: encodes slices, keeps error-feedback residuals.

    ``encode`` returns the parts and a pending residual; ``commit`` makes the
    residuals of an applied push current. Not committing (the push was
    refused) drops that gradient exactly as an uncompressed refused push is
    dropped.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residuals: dict[str, torch.Tensor] = {}

    def encode(
        self, key: str, grad: torch.Tensor
    ) -> tuple[list[TensorHeader], list[torch.Tensor], torch.Tensor | None]:
        grad = grad.detach().cpu()
        if not self.codec.error_feedback:
            parts = self.codec.encode(grad)
            return self.codec.part_headers(key, parts), parts, None
        residual = self.residuals.get(key)
        acc = grad + residual if residual is not None else grad.clone()
        parts = self.codec.encode(acc)
        target = TensorHeader(key, dtype_name(acc.dtype), tuple(acc.shape))
        pending = acc.sub_(self.codec.decode(target, parts))
        return self.codec.part_headers(key, parts), parts, pending

    def commit(self, pending: dict[str, torch.Tensor]) -> None:
        self.residuals.update(pending)
