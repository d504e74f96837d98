"""What a probe child runs: import the task, build its model on the meta device, describe it.

Runs in a forked child of the probe process, never in the controller. The
answer is one JSON object written to the result descriptor: either
``{"parameters": [{"name", "dtype", "shape"}, ...]}`` or
``{"error": <text>, "kind": <task|memory|exit|exception>}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import torch

from elasticd.shape_probe.limits import OUT_OF_MEMORY
from elasticd.task import TaskError, load_task
from elasticd.wire import WireError, dtype_name


def describe(task: str, batch_size: int, seed: int, task_args: dict[str, Any]) -> dict[str, Any]:
    """The task's parameters as plain data: shapes without memory."""
    loaded = load_task(task, batch_size, seed, task_args)
    with torch.device("meta"):
        model = loaded.build_model()
    return {
        "parameters": [
            {"name": name, "dtype": dtype_name(p.dtype), "shape": list(p.shape)}
            for name, p in model.named_parameters()
        ]
    }


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """Run the task's code and say what happened, whatever it raises."""
    try:
        return describe(
            request["task"], request["batch_size"], request["seed"], request["task_args"]
        )
    except (TaskError, WireError) as exc:
        return {"error": str(exc), "kind": "task"}
    except MemoryError:
        return {"error": "MemoryError", "kind": "memory"}
    except SystemExit as exc:
        return {"error": f"sys.exit({exc.code!r})", "kind": "exit"}
    except BaseException as exc:  # the task's own error, whatever it is
        traceback.print_exc()
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        oom = any(s in last.lower() for s in OUT_OF_MEMORY)
        return {"error": last[:2000], "kind": "memory" if oom else "exception"}


def run_child(request: dict[str, Any], result_fd: int) -> int:
    """The child's whole life after fork: answer, write the answer, return the exit code."""
    out = answer(request)
    data = json.dumps(out).encode()
    sys.stdout.flush()
    sys.stderr.flush()
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view) :]
    os.close(result_fd)
    return 0
