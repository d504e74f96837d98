"""The optimizers a job may name, and validation of their arguments.

Optimizers are torch.optim's own, found by name in a registry, so state moves
between a PS shard and a worker replica as an ordinary ``state_dict()``.
Arguments are checked against the constructor's signature; values must be
plain numbers, booleans or short lists of numbers — nothing else is accepted
from a job spec.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
}

# Constructor arguments that change where or how the step runs, not what it
# computes; the PS and the workers choose these themselves.
_RESERVED = {"params", "foreach", "fused", "capturable", "differentiable"}


class OptimizerError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, (list, tuple)) and len(value) <= 4:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return False


def validate_optimizer(name: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check ``name`` and ``kwargs``; returns JSON-able kwargs (tuples become lists)."""
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise OptimizerError("name", f"must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if not isinstance(kwargs, dict):
        raise OptimizerError("kwargs", f"must be a mapping, got {type(kwargs).__name__}")
    params = inspect.signature(OPTIMIZERS[name].__init__).parameters
    allowed = {p for p in params if p not in _RESERVED and p != "self"}
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in allowed:
            raise OptimizerError(
                key, f"not an argument of {name} (known: {', '.join(sorted(allowed))})"
            )
        if not _plain(value):
            raise OptimizerError(
                key, f"must be a number, a boolean or a list of numbers, got {value!r}"
            )
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    lr = out.get("lr", params["lr"].default if "lr" in params else None)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise OptimizerError("lr", f"must be a positive number, got {lr!r}")
    return out


def build_optimizer(
    name: str, kwargs: dict[str, Any], params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    # foreach=False: the per-tensor loop is the reference arithmetic, so a PS
    # shard and a local optimizer over the same tensors agree bit for bit.
    return OPTIMIZERS[name](params, foreach=False, **args)
