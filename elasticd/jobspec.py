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
from elasticd.spec_checks import (
    FieldErrors,
    SpecError,
    int_field,
    mapping_field,
    missing,
    reject_unknown,
    seconds_field,
)

__all__ = ["SpecError", "JobSpec", "parse_spec", "load_spec_yaml", "workers_errors"]

MODES = ("ps-async", "allreduce", "script")
COMPRESSIONS = ("none", "fp16", "bf16", "topk", "qsgd")  # elasticd/compression.py
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# A generation and its assignments are single etcd writes (under 1.5 MiB): about 80 bytes
# a member keeps this many workers well inside one request.
MAX_WORKERS = 4096


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
    # directory the controller writes the job's TensorBoard scalars under ("": none)
    tensorboard: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The spec in the shape a user writes it (parse_spec(to_dict()) == self)."""
        data = asdict(self)
        data["optimizer"] = {"name": self.optimizer.name, **self.optimizer.kwargs}
        data["script"]["args"] = list(self.script.args)
        data["switch"] = [asdict(x) for x in self.switch]
        if not self.steps:  # a script job that counts its own steps
            del data["steps"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        return parse_spec(json.loads(text))


def workers_errors(wmin: Any, wmax: Any, path: str = "workers.") -> list[str]:
    """What is wrong with a job's worker bounds (at submit and at ScaleJob), field by field."""
    errors = []
    for key, value in (("min", wmin), ("max", wmax)):
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}{key}: must be an integer, got {value!r}")
        elif value < 1:
            errors.append(f"{path}{key}: must be >= 1, got {value}")
        elif value > MAX_WORKERS:
            errors.append(f"{path}{key}: at most {MAX_WORKERS} workers, got {value}")
    if not errors and wmax < wmin:
        errors.append(f"{path}max: must be >= {path}min ({wmin}), got {wmax}")
    return errors


def _workers(raw: dict) -> WorkersSpec:
    e = FieldErrors()
    e.check(lambda: reject_unknown(raw, {"min", "max"}, "workers."), None)
    wmin = raw.get("min", 1)
    wmax = raw.get("max", wmin)
    errors = workers_errors(wmin, wmax)
    if "max" not in raw:  # it follows min: min's error says it all
        errors = [x for x in errors if not x.startswith("workers.max:")]
    errors = e.items + errors
    if errors:
        raise SpecError(*errors)
    return WorkersSpec(wmin, wmax)


def _name(data: dict) -> str:
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(f"name: must be 1-40 lowercase letters, digits or '-', got {name!r}")
    return name


def _mode(data: dict) -> str:
    mode = data.get("mode")
    if mode not in MODES:
        raise SpecError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _task(data: dict, mode: str, base_dir: str | None) -> str:
    task = data.get("task", "")
    if mode != "script" and (not isinstance(task, str) or not task):
        raise SpecError("task: must name a task module or a .py file")
    if not isinstance(task, str):
        raise SpecError(f"task: must be a string, got {task!r}")
    if task.endswith(".py") and base_dir and not os.path.isabs(task):
        task = os.path.normpath(os.path.join(base_dir, task))
    return task


def _steps(data: dict, mode: str) -> int:
    """Required, except in script mode: a script counts its own steps (0: not known)."""
    if "steps" in data:
        return int_field(data, "steps", "", 0, minimum=1)
    return 0 if mode == "script" else missing("steps")


def _optimizer(raw: dict) -> OptimizerSpec:
    opt_raw = dict(raw)
    opt_name = opt_raw.pop("name", "sgd")
    try:
        return OptimizerSpec(opt_name, validate_optimizer(opt_name, opt_raw))
    except OptimizerError as exc:
        raise SpecError(f"optimizer.{exc.field}: {exc.reason}") from None


def _ps(raw: dict) -> PSSpec:
    reject_unknown(raw, {"max_staleness", "compression", "replicas"}, "ps.")
    e = FieldErrors()
    staleness = e.check(lambda: int_field(raw, "max_staleness", "ps.", -1, minimum=-1), -1)
    replicas = e.check(lambda: int_field(raw, "replicas", "ps.", 1, minimum=1), 1)
    if replicas > MAX_REPLICAS:
        e.items.append(f"ps.replicas: at most {MAX_REPLICAS} copies are kept, got {replicas}")
    compression = raw.get("compression", "none")
    if not isinstance(compression, str) or not _codec_ok(compression):
        e.items.append(
            f"ps.compression: must be one of {', '.join(COMPRESSIONS)} "
            f"(topk:RATIO and qsgd:LEVELS take an argument), got {compression!r}"
        )
    e.raise_any()
    return PSSpec(staleness, compression, replicas)


def _checkpoint(raw: dict, base_dir: str | None) -> CheckpointSpec:
    reject_unknown(raw, {"url", "every_steps", "every_s", "keep"}, "checkpoint.")
    e = FieldErrors()
    url = raw.get("url", "")
    if not isinstance(url, str):
        e.items.append(f"checkpoint.url: must be a string, got {url!r}")
        url = ""
    if url and "://" not in url and base_dir and not os.path.isabs(url):
        url = os.path.normpath(os.path.join(base_dir, url))
    spec = CheckpointSpec(
        url,
        e.check(lambda: int_field(raw, "every_steps", "checkpoint.", 0, 0), 0),
        e.check(lambda: seconds_field(raw, "every_s", 0.0, "checkpoint."), 0.0),
        e.check(lambda: int_field(raw, "keep", "checkpoint.", 0, 0), 0),
    )
    e.raise_any()
    return spec


def _directory(data: dict, key: str, base_dir: str | None) -> str:
    """A directory the controller writes to; relative: against the spec's directory."""
    path = data.get(key, "")
    if not isinstance(path, str):
        raise SpecError(f"{key}: must be a directory path (a string), got {path!r}")
    if path and base_dir and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    return path


def _data(raw: dict) -> DataSpec:
    reject_unknown(raw, {"shard_batches", "epoch_batches"}, "data.")
    e = FieldErrors()
    spec = DataSpec(
        e.check(lambda: int_field(raw, "shard_batches", "data.", 32, minimum=1), 32),
        e.check(lambda: int_field(raw, "epoch_batches", "data.", 0, minimum=0), 0),
    )
    e.raise_any()
    return spec


def parse_spec(data: Any, base_dir: str | None = None) -> JobSpec:
    """Validate a decoded spec. Relative task paths resolve against ``base_dir``.

    Raises one SpecError that lists every malformed field (``.errors``).
    """
    if not isinstance(data, dict):
        raise SpecError("spec: must be a mapping of fields")
    e = FieldErrors()
    e.check(lambda: reject_unknown(data, set(JobSpec.__dataclass_fields__), ""), None)

    def section(key: str) -> dict:
        return e.check(lambda: mapping_field(data, key, ""), {})

    name = e.check(lambda: _name(data), "")
    mode = e.check(lambda: _mode(data), "")
    spec = JobSpec(
        name=name,
        mode=mode,
        task=e.check(lambda: _task(data, mode, base_dir), ""),
        steps=e.check(lambda: _steps(data, mode), 0),
        batch_size=e.check(lambda: int_field(data, "batch_size", "", 32, minimum=1), 32),
        seed=e.check(lambda: int_field(data, "seed", "", 0), 0),
        task_args=dict(section("task_args")),
        workers=e.check(lambda: _workers(section("workers")), WorkersSpec()),
        optimizer=e.check(lambda: _optimizer(section("optimizer")), OptimizerSpec()),
        ps=e.check(lambda: _ps(section("ps")), PSSpec()),
        checkpoint=e.check(lambda: _checkpoint(section("checkpoint"), base_dir), CheckpointSpec()),
        data=e.check(lambda: _data(section("data")), DataSpec()),
        script=e.check(lambda: _script(section("script"), mode, base_dir), ScriptSpec()),
        switch=e.check(lambda: _switches(data.get("switch", []), mode) if mode else (), ()),
        allreduce=e.check(lambda: _allreduce(section("allreduce")), {}),
        max_restarts=e.check(lambda: int_field(data, "max_restarts", "", 3, minimum=0), 3),
        report_every_steps=e.check(
            lambda: int_field(data, "report_every_steps", "", 10, minimum=1), 10
        ),
        hang_timeout_s=e.check(lambda: seconds_field(data, "hang_timeout_s", 120.0), 120.0),
        tensorboard=e.check(lambda: _directory(data, "tensorboard", base_dir), ""),
    )
    e.raise_any()
    return spec


def _script(raw: dict, mode: str, base_dir: str | None) -> ScriptSpec:
    reject_unknown(raw, {"path", "args", "master_port"}, "script.")
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
    port = int_field(raw, "master_port", "script.", 0, minimum=0)
    if port > 65535:
        raise SpecError(f"script.master_port: must be a TCP port, got {port}")
    return ScriptSpec(path, tuple(str(a) for a in args), port)


def _codec_ok(name: str) -> bool:
    from elasticd.codec_names import CompressionError, parse_codec

    try:
        parse_codec(name)
    except CompressionError:
        return False
    return True


def _allreduce(raw: dict) -> dict[str, Any]:
    reject_unknown(
        raw, {"scale_lr", "warmup_steps", "collective_timeout_s", "bucket_cap_mb"}, "allreduce."
    )
    if "scale_lr" in raw and not isinstance(raw["scale_lr"], bool):
        raise SpecError(f"allreduce.scale_lr: must be true or false, got {raw['scale_lr']!r}")
    if "warmup_steps" in raw:
        int_field(raw, "warmup_steps", "allreduce.", 0, minimum=0)
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
        reject_unknown(item, {"at_step", "mode"}, path)
        at = (
            int_field(item, "at_step", path, 0, minimum=1)
            if "at_step" in item
            else missing(path + "at_step")
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


def load_spec_yaml(text: str, base_dir: str | None = None) -> JobSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"spec: not valid YAML: {exc}") from None
    return parse_spec(data, base_dir)
