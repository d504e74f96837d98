"""The task contract: what a job trains, independent of how it is trained.

A task is a Python module (a file path or an importable module name in the job
spec) with a function ``make_task(batch_size: int, seed: int, **task_args)``
that returns an object with:

``build_model() -> torch.nn.Module``
    A fresh model. Two calls with the same seed must give identical parameters.
``batch(index: int) -> tuple[torch.Tensor, ...]``
    Minibatch number ``index`` (``index >= 0``) of ``batch_size`` samples,
    a pure function of (seed, index): the controller hands out batch indices,
    so every batch must be reproducible from its index alone.
``loss(model, batch) -> torch.Tensor``
    Scalar training loss of ``model`` on ``batch``.

Training modes (ps-async, allreduce) drive these three calls; a task never
knows how its gradients travel.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Task(Protocol):
    def build_model(self) -> torch.nn.Module: ...

    def batch(self, index: int) -> tuple[torch.Tensor, ...]: ...

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor: ...


class TaskError(ValueError):
    """The task named by a job spec cannot be loaded or built."""


def import_task_module(ref: str) -> Any:
    """Import a task module from a ``.py`` file path or a dotted module name."""
    if ref.endswith(".py"):
        path = Path(ref)
        if not path.is_file():
            raise TaskError(f"task file {ref!r} does not exist")
        # A stable module name per path: the same file imported twice is one module.
        name = "elasticd_task_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TaskError(f"task file {ref!r} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise TaskError(f"task module {ref!r} cannot be imported: {exc}") from exc


def load_task(ref: str, batch_size: int, seed: int, args: dict[str, Any] | None = None) -> Task:
    module = import_task_module(ref)
    make = getattr(module, "make_task", None)
    if make is None:
        raise TaskError(f"task {ref!r} has no make_task(batch_size, seed, **task_args)")
    return make(batch_size=batch_size, seed=seed, **(args or {}))
