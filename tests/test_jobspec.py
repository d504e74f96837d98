"""Job specs and optimizer arguments: valid specs parse, malformed ones name their field.

Invariant 8: a malformed spec is rejected with a message that starts with the
path of the offending field, so a person knows what to fix.
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from elasticd.jobspec import JobSpec, SpecError, load_spec_yaml, parse_spec
from elasticd.optimizers import OPTIMIZERS, OptimizerError, build_optimizer, validate_optimizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

VALID: dict[str, Any] = {
    "name": "tiny-job",
    "mode": "ps-async",
    "task": "linreg.py",
    "steps": 20,
    "batch_size": 8,
    "seed": 3,
    "task_args": {"dim": 4},
    "workers": {"min": 1, "max": 3},
    "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.8, 0.95]},
    "ps": {"max_staleness": 2, "compression": "none"},
    "checkpoint": {"url": "memory://ck", "every_steps": 5},
    "max_restarts": 2,
    "report_every_steps": 4,
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """VALID with top-level fields replaced (None removes a field); nested dicts are copied."""
    data = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


# -- valid specs -------------------------------------------------------------


@pytest.mark.parametrize("example", ["charlm", "linreg"])
def test_examples_load(example: str) -> None:
    text = (EXAMPLES / f"{example}.yaml").read_text()
    spec = load_spec_yaml(text, str(EXAMPLES))
    assert spec.name == example
    assert spec.mode == "ps-async"
    # The relative task path resolves against the spec's directory.
    assert spec.task == os.path.join(str(EXAMPLES), f"{example}.py")
    assert os.path.isfile(spec.task)
    assert spec.steps > 0
    assert 1 <= spec.workers.min <= spec.workers.max
    assert spec.optimizer.name in OPTIMIZERS
    assert parse_spec(spec.to_dict()) == spec
    assert JobSpec.from_json(spec.to_json()) == spec


def test_charlm_fields() -> None:
    spec = load_spec_yaml((EXAMPLES / "charlm.yaml").read_text(), str(EXAMPLES))
    assert spec.optimizer.name == "adam"
    assert spec.optimizer.kwargs == {"lr": 0.003}
    assert spec.ps.max_staleness == 4
    assert spec.checkpoint.every_steps == 100
    assert spec.task_args["d_model"] == 128
    assert (spec.workers.min, spec.workers.max) == (1, 2)


def test_full_spec_round_trip() -> None:
    spec = parse_spec(VALID, base_dir="/srv/jobs")
    assert spec.task == "/srv/jobs/linreg.py"
    assert spec.workers.max == 3
    assert spec.optimizer.kwargs == {"lr": 0.001, "betas": [0.8, 0.95]}
    assert spec.checkpoint.url == "memory://ck"  # URLs are not treated as paths
    again = parse_spec(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert JobSpec.from_json(spec.to_json()) == spec


def test_defaults() -> None:
    spec = parse_spec({"name": "d", "mode": "allreduce", "task": "m.task", "steps": 1})
    assert spec.workers.min == spec.workers.max == 1
    assert spec.optimizer.name == "sgd"
    assert spec.ps.max_staleness == -1
    assert spec.ps.compression == "none"
    assert parse_spec(spec.to_dict()) == spec


def test_workers_max_defaults_to_min() -> None:
    spec = parse_spec(spec_with(workers={"min": 3}))
    assert (spec.workers.min, spec.workers.max) == (3, 3)


def test_relative_checkpoint_path_resolves() -> None:
    spec = parse_spec(spec_with(checkpoint={"url": "ck"}), base_dir="/srv/jobs")
    assert spec.checkpoint.url == "/srv/jobs/ck"


# -- malformed specs: the message starts with the field path -----------------


@pytest.mark.parametrize(
    ("changes", "prefix"),
    [
        ({"mode": "federated"}, "mode:"),
        ({"mode": None}, "mode:"),
        ({"steps": None}, "steps:"),
        ({"steps": 0}, "steps:"),
        ({"steps": "many"}, "steps:"),
        ({"steps": True}, "steps:"),
        ({"workers": {"min": 0}}, "workers.min:"),
        ({"workers": {"min": "two"}}, "workers.min:"),
        ({"workers": {"min": 3, "max": 2}}, "workers.max:"),
        ({"workers": {"min": 1, "maximum": 2}}, "workers.maximum:"),
        ({"workers": [1, 2]}, "workers:"),
        ({"epochs": 3}, "epochs:"),
        ({"optimizer": {"name": "lbfgs", "lr": 0.1}}, "optimizer.name:"),
        ({"optimizer": {"name": ["sgd"], "lr": 0.1}}, "optimizer.name:"),  # unhashable
        ({"optimizer": {"name": {"sgd": 1}, "lr": 0.1}}, "optimizer.name:"),
        ({"optimizer": {"name": "sgd", "lr": 0.1, "momentun": 0.9}}, "optimizer.momentun:"),
        ({"optimizer": {"name": "adam", "lr": 0.1, "foreach": True}}, "optimizer.foreach:"),
        ({"optimizer": {"name": "sgd", "lr": "fast"}}, "optimizer.lr:"),
        ({"optimizer": {"name": "sgd", "lr": 0}}, "optimizer.lr:"),
        ({"optimizer": {"name": "sgd", "lr": -0.1}}, "optimizer.lr:"),
        ({"optimizer": {"name": "sgd", "lr": True}}, "optimizer.lr:"),
        ({"optimizer": {"name": "adam", "betas": {"a": 1}}}, "optimizer.betas:"),
        ({"optimizer": {"name": "adam", "betas": [0.9, "x"]}}, "optimizer.betas:"),
        ({"name": "CharLM"}, "name:"),
        ({"name": "-lead"}, "name:"),
        ({"name": "x" * 41}, "name:"),
        ({"name": None}, "name:"),
        ({"name": "charlm\n"}, "name:"),  # `$` alone would accept a trailing newline
        ({"task": ""}, "task:"),
        ({"ps": {"max_staleness": -2}}, "ps.max_staleness:"),
        ({"ps": {"max_staleness": 1.5}}, "ps.max_staleness:"),
        ({"ps": {"compression": "zstd"}}, "ps.compression:"),
        ({"ps": {"compression": 3}}, "ps.compression:"),
        ({"ps": {"bandwidth": 1}}, "ps.bandwidth:"),
        ({"checkpoint": {"url": 5}}, "checkpoint.url:"),
        ({"checkpoint": {"every_steps": -1}}, "checkpoint.every_steps:"),
        ({"batch_size": 0}, "batch_size:"),
        ({"max_restarts": -1}, "max_restarts:"),
    ],
)
def test_malformed_spec_names_field(changes: dict[str, Any], prefix: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(**changes))
    assert str(err.value).startswith(prefix), str(err.value)
    # The rest of the message says what is wrong, not just where.
    assert len(str(err.value)) > len(prefix) + 5


def test_unknown_mode_message_lists_modes() -> None:
    with pytest.raises(SpecError, match=r"^mode: must be one of ps-async, allreduce, script"):
        parse_spec(spec_with(mode="federated"))


def test_unknown_field_message_lists_known_fields() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(epochs=3))
    assert "unknown field" in str(err.value)
    assert "steps" in str(err.value)


def test_invalid_yaml() -> None:
    with pytest.raises(SpecError, match=r"^spec: not valid YAML"):
        load_spec_yaml("name: [unclosed\nmode: ps-async\n")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping(text: str) -> None:
    with pytest.raises(SpecError, match=r"^spec:"):
        load_spec_yaml(text)


def test_yaml_reports_nested_field() -> None:
    text = "name: ok\nmode: ps-async\ntask: t.py\nsteps: 3\nworkers:\n  min: 0\n"
    with pytest.raises(SpecError, match=r"^workers\.min: must be >= 1, got 0"):
        load_spec_yaml(text)


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_spec(spec_with(mode="nope"))


# -- optimizers ----------------------------------------------------------------


def test_validate_optimizer_accepts_constructor_arguments() -> None:
    out = validate_optimizer("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True})
    assert out == {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    out = validate_optimizer("adam", {"betas": (0.9, 0.99)})  # lr falls back to Adam's default
    assert out == {"betas": [0.9, 0.99]}


@pytest.mark.parametrize(
    ("name", "kwargs", "field_name"),
    [
        ("rmsprop", {"lr": 0.1}, "name"),
        (None, {"lr": 0.1}, "name"),
        (["sgd"], {"lr": 0.1}, "name"),
        ("sgd", [("lr", 0.1)], "kwargs"),
        ("sgd", {"lr": 0.1, "params": []}, "params"),
        ("adamw", {"lr": 0.1, "fused": True}, "fused"),
        ("adagrad", {"lr": 0.1, "eps": "small"}, "eps"),
        ("adam", {"lr": 0.1, "betas": [0.9, 0.9, 0.9, 0.9, 0.9]}, "betas"),
        ("sgd", {"lr": "0.1"}, "lr"),
    ],
)
def test_validate_optimizer_rejects(name: Any, kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(OptimizerError) as err:
        validate_optimizer(name, kwargs)
    assert err.value.field == field_name
    assert str(err.value).startswith(f"{field_name}: ")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_listed_arguments_are_torchs_own_with_its_defaults(name: str) -> None:
    """The list lets specs be checked without torch; it must not drift from torch."""
    kind = OPTIMIZERS[name]
    params = inspect.signature(getattr(torch.optim, kind.torch_name).__init__).parameters
    for argument, default in kind.arguments.items():
        assert argument in params, f"{kind.torch_name} has no argument {argument}"
        assert params[argument].default == default, (argument, params[argument].default)
    for reserved in ("foreach", "fused", "capturable", "differentiable", "params"):
        assert reserved not in kind.arguments


def test_the_daemons_and_the_cli_check_specs_without_importing_torch() -> None:
    """The controller, agents and CLI never build a model: `import torch` (2 s, 250 MB
    resident) is the PS's and the training processes' alone."""
    code = (
        "import sys, elasticd.cli, elasticd.server.controller.main, elasticd.worker.agent.main\n"
        "from elasticd.jobspec import parse_spec\n"
        f"parse_spec({VALID!r})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
        ("adam", {"lr": 0.01, "betas": [0.8, 0.9]}),
        ("adamw", {"lr": 0.01}),
        ("adagrad", {"lr": 0.1}),
    ],
)
def test_build_optimizer(name: str, kwargs: dict[str, Any]) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(name, validate_optimizer(name, kwargs), [p])
    assert type(opt) is getattr(torch.optim, OPTIMIZERS[name].torch_name)
    group = opt.param_groups[0]
    assert group["foreach"] is False
    assert group["lr"] == kwargs["lr"]
    if "betas" in kwargs:
        assert group["betas"] == tuple(kwargs["betas"])
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p.detach() < 1)


# -- every error at once -------------------------------------------------------


def test_every_malformed_field_is_reported_at_once() -> None:
    bad = spec_with(
        name="Bad Name",
        steps="many",
        workers={"min": 0, "maxx": 2},
        ps={"compression": "zstd", "replicas": 3},
        checkpoint={"every_steps": -1},
        epochs=3,
    )
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    fields = sorted(e.split(":", 1)[0] for e in err.value.errors)
    assert fields == [
        "checkpoint.every_steps",
        "epochs",
        "name",
        "ps.compression",
        "ps.replicas",
        "steps",
        "workers.maxx",
        "workers.min",
    ], err.value.errors
    for e in err.value.errors:
        assert e in str(err.value)


def test_bounds_of_workers_are_checked_together() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(workers={"min": 0, "max": "x"}))
    assert [e.split(":")[0] for e in err.value.errors] == ["workers.min", "workers.max"]


def test_a_single_error_reads_as_before() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(steps=0))
    assert err.value.errors == ("steps: must be >= 1, got 0",)
    assert str(err.value) == "steps: must be >= 1, got 0"


def test_script_mode_needs_no_steps() -> None:
    spec = parse_spec(
        spec_with(mode="script", task=None, steps=None, script={"path": "/srv/train.py"})
    )
    assert spec.steps == 0
    assert JobSpec.from_json(spec.to_json()) == spec  # as it travels in etcd and assignments
    with pytest.raises(SpecError, match=r"^steps: required"):
        parse_spec(spec_with(steps=None))  # the other modes count steps for the job
