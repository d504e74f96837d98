"""Learning a job's parameter shapes without running its code in the controller.

The controller never imports a task (ARCHITECTURE invariant 10). It asks a
probe process (``python -m elasticd.shape_probe``) instead: that process
imports torch once and forks one child per question; the child imports the
task, builds its model on the ``meta`` device under a memory limit and a
timeout, in its own process group, and sends back each parameter's name,
dtype and shape as JSON. See ``docs/design.md`` ("User code never runs in
the controller").

- :mod:`.build`: what a child runs (import, build, describe).
- :mod:`.forkserver`: the probe process: forks children, enforces the limits.
- :mod:`.outcome`: turns what comes back (untrusted) into shapes or a TaskError.
- :mod:`.client`: the controller's side: :class:`ShapeProbe`.
- :mod:`.limits`: the limits and their defaults (no torch: for ``--help``).
"""
