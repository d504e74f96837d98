"""A job's TensorBoard scalars (``tensorboard: DIR`` in its spec), written by the controller.

The controller hears every worker's progress report, so it writes the job's
figures once per new step, under ``DIR/<job id>/``: ``loss``,
``samples_per_second``, ``workers`` and ``generation``. The workers write nothing.
"""

from __future__ import annotations

import logging
import math
import os
import threading

from elasticd.server.controller.planning import JobSnapshot
from elasticd.server.controller.progress import samples_per_step
from elasticd.tensorboard_events import EventWriter

log = logging.getLogger(__name__)


class JobScalars:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writers: dict[str, EventWriter] = {}
        self._last_step: dict[str, int] = {}
        self._broken: set[str] = set()  # jobs whose directory could not be written

    def reported(self, snap: JobSnapshot, step: int, loss: float, steps_per_s: float) -> None:
        """A worker of the job reported ``step``: write the scalars if the step is new."""
        directory = snap.spec.tensorboard
        job_id = snap.record.job_id
        if not directory or snap.generation is None or job_id in self._broken:
            return
        with self._lock:
            if step <= self._last_step.get(job_id, -1):
                return
            self._last_step[job_id] = step
            world = snap.generation.world_size
            values = {
                "samples_per_second": steps_per_s
                * samples_per_step(snap.spec, snap.record.mode, world),
                "workers": float(world),
                "generation": float(snap.generation.number),
            }
            if not math.isnan(loss):
                values["loss"] = loss
            try:
                writer = self._writers.get(job_id)
                if writer is None:
                    writer = self._writers[job_id] = EventWriter(os.path.join(directory, job_id))
                writer.scalars(step, values)
            except OSError as exc:
                self._broken.add(job_id)
                log.warning(
                    "event=tensorboard_unwritable job=%s dir=%s error=%s", job_id, directory, exc
                )

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._writers.pop(job_id, None)
            self._last_step.pop(job_id, None)
