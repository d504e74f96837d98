"""Entry point of a training process: ``python -m elasticd.worker.runtime``.

Started by a node agent, which sends the assignment on stdin. The training
mode is looked up by name in :data:`MODES`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from elasticd.serving import configure_logging
from elasticd.worker.runtime import allreduce, ps_async
from elasticd.worker.runtime.control import Assignment, ControlChannel

MODES: dict[str, Callable[[Assignment, ControlChannel], int]] = {
    "ps-async": ps_async.train,
    "allreduce": allreduce.train,
}


def main() -> int:
    control = ControlChannel()
    first = control.first()
    configure_logging(f"worker:{first.worker_id}")
    mode = first.spec["mode"]
    train = MODES.get(mode)
    if train is None:
        logging.getLogger(__name__).error("event=unsupported_mode mode=%s", mode)
        return 2
    return train(first, control)


if __name__ == "__main__":
    sys.exit(main())
