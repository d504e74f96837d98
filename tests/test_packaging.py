"""The distribution: committed stubs match proto/, and nothing installs outside elasticd."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from elasticd.cli import main as cli_main
from elasticd.rpc.generate import PROTOS, generate
from tests.source_tree import ROOT, copy_source


def test_generated_stubs_match_the_protos(tmp_path):
    generate(tmp_path, ROOT / "proto")
    for name in PROTOS:
        stem = name.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh = (tmp_path / "elasticd" / "rpc" / f"{stem}{suffix}").read_text()
            committed = (ROOT / "elasticd" / "rpc" / f"{stem}{suffix}").read_text()
            assert fresh == committed, f"elasticd/rpc/{stem}{suffix} is stale: run `make proto`"


def test_wheel_installs_server_and_worker_inside_elasticd(tmp_path):
    src = copy_source(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)],
        check=True,
        timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("elasticd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"elasticd", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for module in (
        "elasticd/server/ps/service.py",
        "elasticd/server/controller/controller.py",
        "elasticd/worker/agent/agent.py",
        "elasticd/worker/runtime/__main__.py",
        "elasticd/rpc/ps_pb2.py",
    ):
        assert module in names
    # Every package directory in the tree is in the wheel (pyproject lists them by hand).
    for init in [*ROOT.glob("elasticd/**/__init__.py"), *ROOT.glob("server/**/__init__.py"),
                 *ROOT.glob("worker/**/__init__.py")]:  # fmt: skip
        rel = init.relative_to(ROOT).as_posix()
        installed = rel if rel.startswith("elasticd/") else f"elasticd/{rel}"
        assert installed in names, f"{rel} is not packaged: add it to pyproject's packages"


def test_every_subcommand_has_help(capsys):
    # The installed entry point answers as a process; each subcommand's help is
    # asked of the same parser in this process (a process each costs an import
    # of torch, seconds apiece).
    out = subprocess.run(
        [sys.executable, "-m", "elasticd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage: elasticd" in out.stdout
    for cmd in (
        ["controller"],
        ["ps"],
        ["agent"],
        ["up"],
        ["submit"],
        ["status"],
        ["cancel"],
        ["logs"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli_main([*cmd, "--help"])
        assert exited.value.code == 0, cmd
        assert f"usage: elasticd {cmd[0]}" in capsys.readouterr().out
