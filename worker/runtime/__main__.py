"""Entry point of a training process: ``python -m elasticd.worker.runtime``.

Started by a node agent, which sends the assignment on stdin. The training
mode is looked up by name in :data:`MODES`; a mode returns a
:class:`~elasticd.worker.runtime.switching.Switch` when the job moves to
another mode, and the next one starts from the state it hands over.
"""

from __future__ import annotations

from elasticd.worker.runtime.nondumpable import forbid_inspection

forbid_inspection()  # first: before torch's import, before the agent says anything

import logging  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402

from elasticd.optimizers import warm_up_optimizers  # noqa: E402
from elasticd.serving import configure_logging  # noqa: E402
from elasticd.worker.runtime import allreduce, ps_async  # noqa: E402
from elasticd.worker.runtime.control import Assignment, ControlChannel, ScriptRun  # noqa: E402
from elasticd.worker.runtime.handover import Handover  # noqa: E402
from elasticd.worker.runtime.switching import Switch  # noqa: E402

MODES: dict[str, Callable[[Assignment, ControlChannel, Handover | None], int | Switch]] = {
    "ps-async": ps_async.train,
    "allreduce": allreduce.train,
}


def run_script(script: ScriptRun) -> int:
    """Run a user's script in this interpreter as ``python PATH ARGS`` runs it.

    ``sys.argv``, ``sys.path[0]`` (the script's directory) and ``__main__`` are
    as the command would make them; its exit status is the process's.
    """
    sys.argv = [script.path, *script.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script.path)))
    runpy.run_path(script.path, run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    script = ScriptRun.from_argv(sys.argv[1:] if argv is None else argv)
    if script is not None:  # started for a script: run it now
        return run_script(script)
    control = ControlChannel()
    # A warm process pays torch's first-use costs while it waits to be taken; one
    # launched with its assignment skips them (a ps-async worker builds no optimizer).
    first = control.first(warm_up=warm_up_optimizers)
    if isinstance(first, ScriptRun):  # a warm interpreter taken for a script
        return run_script(first)
    configure_logging(f"worker:{first.worker_id}")
    assignment, handover = first, None
    while True:
        mode = assignment.spec["mode"]
        train = MODES.get(mode)
        if train is None:
            logging.getLogger(__name__).error("event=unsupported_mode mode=%s", mode)
            return 2
        outcome = train(assignment, control, handover)
        if not isinstance(outcome, Switch):
            return outcome
        # A mode switch at a step boundary: the next mode starts from this state.
        assignment, handover = outcome.assignment, outcome.handover


if __name__ == "__main__":
    sys.exit(main())
