"""elasticd: fault-tolerant elastic training for PyTorch.

``from elasticd import connect`` gives a client for programs and notebooks
(:mod:`elasticd.job_handle`); it is imported on first use, so that the
daemons and ``elasticd --help`` do not pay for it.
"""

from __future__ import annotations

from typing import Any


def connect(*args: Any, **kwargs: Any):
    """See :func:`elasticd.job_handle.connect`."""
    from elasticd.job_handle import connect as _connect

    return _connect(*args, **kwargs)
