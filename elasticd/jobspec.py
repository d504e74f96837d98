"""The job spec: what a user submits, validated field by field.

A malformed spec is rejected with a :class:`SpecError` whose message names the
field (``workers.min: must be an integer >= 1, got 'two'``), before anything
is stored. The spec travels as JSON inside elasticd (etcd, assignments) and as
YAML from users.

Batch size is per worker: with ``batch_size: 32`` and 4 workers, one step of
the job consumes 128 samples in all-reduce mode; in ps-async mode every push
carries the gradient of 32 samples.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from elasticd.optimizers import OptimizerError, validate_optimizer

MODES = ("ps-async", "allreduce", "script")
COMPRESSIONS = ("none", "fp16", "bf16", "topk", "qsgd")  # elasticd/compression.py
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class SpecError(ValueError):
    """A job spec is malformed; the message names the field."""


@dataclass(frozen=True)
class WorkersSpec:
    min: int = 1
    max: int = 1


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 0.01})


@dataclass(frozen=True)
class PSSpec:
    max_staleness: int = -1  # < 0: unbounded; 0: synchronous parameter server
    compression: str = "none"
    # 2: every slice group has a hot backup on another PS, which applies every
    # update before the push is acknowledged; a PS loss then loses no
    # acknowledged update. 1: the checkpoint is the only other copy.
    replicas: int = 1


MAX_REPLICAS = 2


@dataclass(frozen=True)
class CheckpointSpec:
    url: str = ""  # empty: the controller's default checkpoint location
    every_steps: int = 0  # 0: not by steps
    every_s: float = 0.0  # 0: not by time (checkpoints are also taken at completion and cancel)
    keep: int = 0  # how many checkpoints to keep, newest first; 0: all


@dataclass(frozen=True)
class DataSpec:
    """How the controller hands out batch indices in ps-async (invariant 6)."""

    # batches per lease: a worker that dies hands back at most this many unfinished
    shard_batches: int = 32
    # batches per epoch: the next epoch's batches are handed out only once every
    # batch of this one is applied. 0: one epoch that never ends.
    epoch_batches: int = 0


@dataclass(frozen=True)
class ScriptSpec:
    """A torchrun-style script run unmodified (mode ``script``)."""

    path: str = ""
    args: tuple[str, ...] = ()
    master_port: int = 0  # 0: derived per job and generation


@dataclass(frozen=True)
class ModeSwitch:
    """Switch a running job to ``mode`` once it reaches step ``at_step``."""

    at_step: int
    mode: str


SWITCHABLE = ("ps-async", "allreduce")


@dataclass(frozen=True)
class JobSpec:
    name: str
    mode: str
    task: str
    steps: int
    batch_size: int = 32
    seed: int = 0
    task_args: dict[str, Any] = field(default_factory=dict)
    workers: WorkersSpec = field(default_factory=WorkersSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    ps: PSSpec = field(default_factory=PSSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    data: DataSpec = field(default_factory=DataSpec)
    script: ScriptSpec = field(default_factory=ScriptSpec)
    switch: tuple[ModeSwitch, ...] = ()
    # allreduce options; absent keys take the runtime's defaults (see README)
    allreduce: dict[str, Any] = field(default_factory=dict)
    max_restarts: int = 3
    report_every_steps: int = 10
    # a training process silent for this long is killed and handled as failed (0: never)
    hang_timeout_s: float = 120.0

    def to_dict(self) -> dict[str, Any]:
        """The spec in the shape a user writes it (parse_spec(to_dict()) == self)."""
        data = asdict(self)
        data["optimizer"] = {"name": self.optimizer.name, **self.optimizer.kwargs}
        data["script"]["args"] = list(self.script.args)
        data["switch"] = [asdict(x) for x in self.switch]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        return parse_spec(json.loads(text))


def _int(data: dict, key: str, path: str, default: int, minimum: int | None = None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}{key}: must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{path}{key}: must be >= {minimum}, got {value}")
    return value


def _mapping(data: dict, key: str, path: str) -> dict:
    value = data.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{path}{key}: must be a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(data: dict, known: set[str], path: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{path}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


def parse_spec(data: Any, base_dir: str | None = None) -> JobSpec:
    """Validate a decoded spec. Relative task paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise SpecError("spec: must be a mapping of fields")
    _reject_unknown(data, {f for f in JobSpec.__dataclass_fields__}, "")

    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(f"name: must be 1-40 lowercase letters, digits or '-', got {name!r}")
    mode = data.get("mode")
    if mode not in MODES:
        raise SpecError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    task = data.get("task", "")
    if mode != "script" and (not isinstance(task, str) or not task):
        raise SpecError("task: must name a task module or a .py file")
    if not isinstance(task, str):
        raise SpecError(f"task: must be a string, got {task!r}")
    if task.endswith(".py") and base_dir and not os.path.isabs(task):
        task = os.path.normpath(os.path.join(base_dir, task))
    task_args = _mapping(data, "task_args", "")

    workers_raw = _mapping(data, "workers", "")
    _reject_unknown(workers_raw, {"min", "max"}, "workers.")
    wmin = _int(workers_raw, "min", "workers.", 1, minimum=1)
    wmax = _int(workers_raw, "max", "workers.", wmin, minimum=1)
    if wmax < wmin:
        raise SpecError(f"workers.max: must be >= workers.min ({wmin}), got {wmax}")

    opt_raw = dict(_mapping(data, "optimizer", ""))
    opt_name = opt_raw.pop("name", "sgd")
    try:
        opt_kwargs = validate_optimizer(opt_name, opt_raw)
    except OptimizerError as exc:
        raise SpecError(f"optimizer.{exc.field}: {exc.reason}") from None

    ps_raw = _mapping(data, "ps", "")
    _reject_unknown(ps_raw, {"max_staleness", "compression", "replicas"}, "ps.")
    staleness = _int(ps_raw, "max_staleness", "ps.", -1, minimum=-1)
    replicas = _int(ps_raw, "replicas", "ps.", 1, minimum=1)
    if replicas > MAX_REPLICAS:
        raise SpecError(f"ps.replicas: at most {MAX_REPLICAS} copies are kept, got {replicas}")
    compression = ps_raw.get("compression", "none")
    if not isinstance(compression, str) or not _codec_ok(compression):
        raise SpecError(
            f"ps.compression: must be one of {', '.join(COMPRESSIONS)} "
            f"(topk:RATIO and qsgd:LEVELS take an argument), got {compression!r}"
        )

    ck_raw = _mapping(data, "checkpoint", "")
    _reject_unknown(ck_raw, {"url", "every_steps", "every_s", "keep"}, "checkpoint.")
    ck_url = ck_raw.get("url", "")
    if not isinstance(ck_url, str):
        raise SpecError(f"checkpoint.url: must be a string, got {ck_url!r}")
    if ck_url and "://" not in ck_url and base_dir and not os.path.isabs(ck_url):
        ck_url = os.path.normpath(os.path.join(base_dir, ck_url))

    data_raw = _mapping(data, "data", "")
    _reject_unknown(data_raw, {"shard_batches", "epoch_batches"}, "data.")
    data_spec = DataSpec(
        _int(data_raw, "shard_batches", "data.", 32, minimum=1),
        _int(data_raw, "epoch_batches", "data.", 0, minimum=0),
    )

    script = _script(_mapping(data, "script", ""), mode, base_dir)

    return JobSpec(
        name=name,
        mode=mode,
        task=task,
        steps=_int(data, "steps", "", 0, minimum=1) if "steps" in data else _missing("steps"),
        batch_size=_int(data, "batch_size", "", 32, minimum=1),
        seed=_int(data, "seed", "", 0),
        task_args=dict(task_args),
        workers=WorkersSpec(wmin, wmax),
        optimizer=OptimizerSpec(opt_name, opt_kwargs),
        ps=PSSpec(staleness, compression, replicas),
        checkpoint=CheckpointSpec(
            ck_url,
            _int(ck_raw, "every_steps", "checkpoint.", 0, 0),
            _seconds(ck_raw, "every_s", 0.0, "checkpoint."),
            _int(ck_raw, "keep", "checkpoint.", 0, 0),
        ),
        data=data_spec,
        script=script,
        switch=_switches(data.get("switch", []), mode),
        allreduce=_allreduce(_mapping(data, "allreduce", "")),
        max_restarts=_int(data, "max_restarts", "", 3, minimum=0),
        report_every_steps=_int(data, "report_every_steps", "", 10, minimum=1),
        hang_timeout_s=_seconds(data, "hang_timeout_s", 120.0),
    )


def _script(raw: dict, mode: str, base_dir: str | None) -> ScriptSpec:
    _reject_unknown(raw, {"path", "args", "master_port"}, "script.")
    path = raw.get("path", "")
    if mode == "script" and (not isinstance(path, str) or not path):
        raise SpecError("script.path: required in script mode (the training script to run)")
    if not isinstance(path, str):
        raise SpecError(f"script.path: must be a string, got {path!r}")
    if path and base_dir and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    args = raw.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
        raise SpecError("script.args: must be a list of strings")
    port = _int(raw, "master_port", "script.", 0, minimum=0)
    if port > 65535:
        raise SpecError(f"script.master_port: must be a TCP port, got {port}")
    return ScriptSpec(path, tuple(str(a) for a in args), port)


def _seconds(data: dict, key: str, default: float, path: str = "") -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SpecError(f"{path}{key}: must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _codec_ok(name: str) -> bool:
    from elasticd.compression import CompressionError, codec_for

    try:
        codec_for(name)
    except CompressionError:
        return False
    return True


def _allreduce(raw: dict) -> dict[str, Any]:
    _reject_unknown(
        raw, {"scale_lr", "warmup_steps", "collective_timeout_s", "bucket_cap_mb"}, "allreduce."
    )
    if "scale_lr" in raw and not isinstance(raw["scale_lr"], bool):
        raise SpecError(f"allreduce.scale_lr: must be true or false, got {raw['scale_lr']!r}")
    if "warmup_steps" in raw:
        _int(raw, "warmup_steps", "allreduce.", 0, minimum=0)
    for key in ("collective_timeout_s", "bucket_cap_mb"):
        value = raw.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SpecError(f"allreduce.{key}: must be a number > 0, got {value!r}")
    return dict(raw)


def _switches(raw: Any, mode: str) -> tuple[ModeSwitch, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError("switch: must be a list of {at_step, mode}")
    out: list[ModeSwitch] = []
    current = mode
    for i, item in enumerate(raw):
        path = f"switch[{i}]."
        if not isinstance(item, dict):
            raise SpecError(f"switch[{i}]: must be a mapping with at_step and mode")
        _reject_unknown(item, {"at_step", "mode"}, path)
        at = (
            _int(item, "at_step", path, 0, minimum=1)
            if "at_step" in item
            else _missing(path + "at_step")
        )
        target = item.get("mode")
        if target not in SWITCHABLE:
            raise SpecError(f"{path}mode: must be one of {', '.join(SWITCHABLE)}, got {target!r}")
        if current not in SWITCHABLE:
            raise SpecError(f"{path}mode: a {mode} job cannot switch modes")
        if out and at <= out[-1].at_step:
            raise SpecError(f"{path}at_step: must be after the previous switch ({out[-1].at_step})")
        out.append(ModeSwitch(at, target))
        current = target
    return tuple(out)


def _missing(field_name: str) -> int:
    raise SpecError(f"{field_name}: required")


def load_spec_yaml(text: str, base_dir: str | None = None) -> JobSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"spec: not valid YAML: {exc}") from None
    return parse_spec(data, base_dir)
