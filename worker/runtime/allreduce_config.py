"""The spec's ``allreduce:`` section, checked field by field."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from elasticd.worker.runtime.grad_buckets import BUCKET_CAP_BYTES
from elasticd.worker.runtime.process_group import COLLECTIVE_TIMEOUT_S


@dataclass(frozen=True)
class AllreduceConfig:
    """The spec's ``allreduce:`` section, with its defaults."""

    scale_lr: bool = True  # linear scaling rule: lr * world_size / workers.max
    warmup_steps: int = 0  # ramp a raised lr over this many steps (0: at once)
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S  # a stuck collective fails after this
    bucket_cap_mb: float = BUCKET_CAP_BYTES / 2**20  # gradient bucket size, as DDP's

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> AllreduceConfig:
        raw = spec.get("allreduce") or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"allreduce.{unknown[0]}: unknown field (known: {sorted(known)})")
        config = cls(**raw)
        if not isinstance(config.scale_lr, bool):
            raise ValueError(f"allreduce.scale_lr: must be a boolean, got {config.scale_lr!r}")
        if isinstance(config.warmup_steps, bool) or not isinstance(config.warmup_steps, int):
            raise ValueError(
                f"allreduce.warmup_steps: must be an integer, got {config.warmup_steps!r}"
            )
        if config.warmup_steps < 0:
            raise ValueError(f"allreduce.warmup_steps: must be >= 0, got {config.warmup_steps}")
        for name in ("collective_timeout_s", "bucket_cap_mb"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"allreduce.{name}: must be a number > 0, got {value!r}")
        return config
