"""A copy of the project's source tree, as a user's checkout has it."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_source(dest: Path) -> Path:
    """Copy the checkout to ``dest`` without the venv, git data or build output.

    Builds run from a copy: a build in the checkout would leave build/ and
    *.egg-info behind, and the copy holds what a fresh clone holds.
    """
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".elasticd", "build", "*.egg-info", "__pycache__", ".ruff_cache"
        ),
    )
    return dest
