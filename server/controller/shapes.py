"""A job's parameter shapes: probed once at submit, stored with the job, read ever after.

The controller never imports a task (ARCHITECTURE invariant 10): the shapes
come from :class:`elasticd.shape_probe.ShapeProbe`, which builds the model
in a sandboxed process. They are learned at submit and written next to the
spec (``jobs/<id>/tensors``), so that sealing, placement, allreduce
checkpoints and restore, here or on a new leader after a fail-over, read
them instead of building the model again. A job admitted before the shapes
were stored is probed on first use, and its shapes are stored then (only if
nobody stored them meanwhile), once per job.
"""

from __future__ import annotations

import logging
import threading

from elasticd.coord.etcd import Put
from elasticd.coord.keys import Keys
from elasticd.jobspec import JobSpec
from elasticd.placement import TensorSpec, tensors_to_json
from elasticd.server.controller.planning import JobSnapshot
from elasticd.server.controller.writes import JobWriter
from elasticd.shape_probe.client import ShapeProbe

log = logging.getLogger(__name__)


class JobShapes:
    def __init__(self, probe: ShapeProbe, writer: JobWriter, keys: Keys) -> None:
        self.probe = probe
        self._writer = writer
        self._keys = keys
        self._lock = threading.Lock()
        self._probed: dict[str, list[TensorSpec]] = {}  # job -> shapes probed after admission

    def at_submit(self, spec: JobSpec) -> list[TensorSpec] | None:
        """The new job's parameters (None for a script job, which brings its own model).

        Raises TaskError when the task cannot be imported or built in the probe."""
        if spec.mode == "script":
            return None
        return self.probe.shapes(spec.task, spec.batch_size, spec.seed, spec.task_args)

    def admission_ops(self, job_id: str, tensors: list[TensorSpec] | None) -> list[Put]:
        if tensors is None:
            return []
        return [Put(self._keys.job_tensors(job_id), tensors_to_json(tensors).encode())]

    def of(self, snap: JobSnapshot) -> list[TensorSpec]:
        """The job's parameters as stored at submit; probed (and stored) if they never were."""
        if snap.tensors is not None:
            return list(snap.tensors)
        job_id = snap.record.job_id
        with self._lock:
            known = self._probed.get(job_id)
        if known is None:
            spec = snap.spec
            known = self.probe.shapes(spec.task, spec.batch_size, spec.seed, spec.task_args)
            with self._lock:
                self._probed[job_id] = known
            log.info("event=job_shapes_probed job=%s parameters=%d", job_id, len(known))
        try:
            stored = self._writer.create_key(job_id, self.admission_ops(job_id, known)[0])
        except Exception as exc:  # known here meanwhile; stored on a later use
            log.warning("event=job_shapes_not_stored job=%s error=%s", job_id, exc)
            stored = False
        if stored:
            with self._lock:
                self._probed.pop(job_id, None)
        return list(known)
