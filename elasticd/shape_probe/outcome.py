"""What a probe child sent back, judged: the job's shapes, or a TaskError saying what happened.

Everything here is plain functions over the probe process's reply. The
child ran user code, so its answer is untrusted: bounded in size, JSON of
the one expected shape, known dtypes, non-negative integer dimensions,
unique names. Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from elasticd.dtypes import ITEMSIZE
from elasticd.placement import TensorSpec
from elasticd.shape_probe.limits import OUT_OF_MEMORY, RESULT_LIMIT
from elasticd.task import TaskError

MAX_PARAMETERS = 200_000
MAX_NAME = 1024  # characters in a parameter's name
MAX_DIMS = 32
MAX_DIM = 1 << 48  # elements along one dimension


class BadProbeOutput(ValueError):
    """The child's answer is not a description of parameters."""


def _parameter(item: Any, seen: set[str]) -> TensorSpec:
    if not isinstance(item, dict) or set(item) != {"name", "dtype", "shape"}:
        raise BadProbeOutput("each parameter must be an object with name, dtype and shape")
    name, dtype, shape = item["name"], item["dtype"], item["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise BadProbeOutput(f"a parameter name must be a string of 1 to {MAX_NAME} characters")
    if name in seen:
        raise BadProbeOutput(f"parameter {name!r} appears twice")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise BadProbeOutput(
            f"parameter {name!r}: dtype {dtype!r} is not one of {sorted(ITEMSIZE)}"
        )
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise BadProbeOutput(f"parameter {name!r}: shape must be a list of at most {MAX_DIMS}")
    if not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise BadProbeOutput(f"parameter {name!r}: shape {shape!r} must hold non-negative integers")
    seen.add(name)
    return TensorSpec(name, dtype, tuple(shape))


def parse_answer(raw: str) -> dict[str, Any]:
    """The child's answer as an object with either ``parameters`` or ``error`` and ``kind``."""
    if len(raw) > RESULT_LIMIT:
        raise BadProbeOutput(f"the answer is larger than {RESULT_LIMIT >> 20} MiB")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadProbeOutput(f"the answer is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadProbeOutput("the answer is not a JSON object")
    if set(data) == {"error", "kind"} and all(isinstance(v, str) for v in data.values()):
        return {"error": data["error"][:2000], "kind": data["kind"]}
    if set(data) != {"parameters"} or not isinstance(data["parameters"], list):
        raise BadProbeOutput("the answer must hold a list of parameters")
    return data


def parse_shapes(raw: str) -> list[TensorSpec]:
    """The parameters in a child's successful answer (BadProbeOutput otherwise)."""
    data = parse_answer(raw)
    if "parameters" not in data:
        raise BadProbeOutput("the answer holds an error, not parameters")
    items = data["parameters"]
    if len(items) > MAX_PARAMETERS:
        raise BadProbeOutput(f"more than {MAX_PARAMETERS} parameters")
    seen: set[str] = set()
    return [_parameter(item, seen) for item in items]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def shapes_from_reply(
    reply: dict[str, Any], task: str, task_args: dict[str, Any], timeout_s: float, memory_mib: int
) -> list[TensorSpec]:
    """The job's parameters from the probe's reply, or a TaskError that says what went wrong."""
    where = f"task {task!r} (task_args {task_args})"
    status, code = reply.get("status"), reply.get("code")
    log = str(reply.get("log", ""))
    memory = f"{where} exceeded the {memory_mib} MiB memory limit while being imported or built"
    if status == "timeout":
        raise TaskError(f"{where} timed out after {timeout_s:g} s while being imported or built")
    if status == "overflow":
        raise TaskError(f"{where}: the probe's answer was larger than {RESULT_LIMIT >> 20} MiB")
    if status == "signalled" and isinstance(code, int):
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise TaskError(f"{where} was killed by {name} while being imported or built")
    if status != "exited" or not isinstance(code, int):
        raise TaskError(f"{where}: the probe ended in an unknown way ({status!r})")
    try:
        data = parse_answer(str(reply.get("result", "")))
    except BadProbeOutput as exc:
        if any(s in log.lower() for s in OUT_OF_MEMORY) or "MemoryError" in log:
            raise TaskError(memory) from None
        detail = _last_line(log) or str(exc)
        raise TaskError(
            f"{where}: the probe exited with code {code} without an answer: {detail}"
        ) from None
    if "error" in data:
        kind, error = data["kind"], data["error"]
        if kind == "memory":
            raise TaskError(memory)
        if kind == "exit":
            raise TaskError(f"{where} called {error} while being imported or built")
        if kind == "task":
            raise TaskError(error)
        raise TaskError(f"{where} cannot be built: {error}")
    try:
        return parse_shapes(str(reply["result"]))
    except BadProbeOutput as exc:
        raise TaskError(f"{where}: the probe's answer is not usable: {exc}") from None
