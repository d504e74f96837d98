"""Job specs for tests, written as a user would write them."""

from __future__ import annotations

from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def spec_yaml(task: str = "linreg.py", **fields) -> str:
    """A job spec for an example task; ``fields`` override or extend it."""
    spec = {
        "name": "t",
        "mode": "ps-async",
        "task": str(EXAMPLES / task),
        "steps": 100,
        "batch_size": 16,
        "workers": {"min": 1, "max": 2},
        "optimizer": {"name": "sgd", "lr": 0.05},
    }
    spec.update(fields)
    return yaml.safe_dump(spec)
