"""The optimizers a job may name, and validation of their arguments.

Optimizers are torch.optim's own, so state moves between a PS shard and a
worker replica as an ordinary ``state_dict()``. The arguments a spec may give
are listed here, with torch's defaults, rather than read from torch: the
controller, the agents and the CLI validate specs without importing torch
(tests/test_jobspec.py checks the list against the installed torch). Values
must be plain numbers, booleans or short lists of numbers; nothing else is
accepted from a job spec. Arguments that change where or how the step runs
(``foreach``, ``fused``, ``capturable``, ``differentiable``) are not a
spec's to give: the PS and the workers choose them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OptimizerKind:
    torch_name: str  # the class in torch.optim
    arguments: dict[str, Any]  # what a spec may set, with torch's default


OPTIMIZERS: dict[str, OptimizerKind] = {
    "sgd": OptimizerKind(
        "SGD",
        {"lr": 1e-3, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
         "maximize": False},
    ),
    "adam": OptimizerKind(
        "Adam",
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
         "maximize": False},
    ),
    "adamw": OptimizerKind(
        "AdamW",
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
         "maximize": False},
    ),
    "adagrad": OptimizerKind(
        "Adagrad",
        {"lr": 1e-2, "lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0,
         "eps": 1e-10, "maximize": False},
    ),
}  # fmt: skip


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
    allowed = OPTIMIZERS[name].arguments
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
    lr = out.get("lr", allowed.get("lr"))
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise OptimizerError("lr", f"must be a positive number, got {lr!r}")
    return out


def build_optimizer(
    name: str, kwargs: dict[str, Any], params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    import torch

    args = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    # foreach=False: the per-tensor loop is the reference arithmetic, so a PS
    # shard and a local optimizer over the same tensors agree bit for bit.
    return getattr(torch.optim, OPTIMIZERS[name].torch_name)(params, foreach=False, **args)


def warm_up_optimizers() -> None:
    """Pay torch's lazy first-use costs of every optimizer now, not at a job's first step.

    The first optimizer built imports torch._dynamo (about 2 s here, more on a
    busy machine). A training process waiting to be taken and a parameter
    server that just started have the time; a job's first InitShard or step
    does not.
    """
    import torch

    param = torch.zeros(1, requires_grad=True)
    param.grad = torch.zeros(1)
    for name in OPTIMIZERS:
        build_optimizer(name, {}, [param]).step()
