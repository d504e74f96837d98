"""Admitting a job: check that its task builds, then write its spec and first record.

The controller learns a job's parameter shapes by building the model on the
``meta`` device: shapes without memory. A task that cannot be built is
refused at submit, not discovered at placement.
"""

from __future__ import annotations

import logging
import time
import uuid

import torch

from elasticd.checkpoint.locate import NoSuchCheckpoint, check_fits, check_optimizer, locate
from elasticd.coord.etcd import Put
from elasticd.coord.keys import Keys
from elasticd.jobspec import JobSpec
from elasticd.placement import TensorSpec
from elasticd.server.controller.errors import Conflict
from elasticd.server.controller.records import PENDING, JobRecord
from elasticd.task import TaskError, load_task
from elasticd.wire import dtype_name

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 5  # a user request retries this often when the job changed under it


def tensor_specs(spec: JobSpec) -> list[TensorSpec]:
    """The job's parameters, built on the meta device: shapes without memory.

    Raises TaskError when the task cannot be imported or built with its arguments.
    """
    try:
        task = load_task(spec.task, spec.batch_size, spec.seed, spec.task_args)
        with torch.device("meta"):
            model = task.build_model()
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(
            f"task {spec.task!r} cannot be built with task_args {spec.task_args}: {exc}"
        ) from exc
    return [
        TensorSpec(name, dtype_name(p.dtype), tuple(p.shape))
        for name, p in model.named_parameters()
    ]


def check_buildable(spec: JobSpec) -> None:
    """Raise TaskError if the job's model cannot be built (script jobs bring their own)."""
    if spec.mode != "script":
        tensor_specs(spec)


def check_resumable(spec: JobSpec, resume_from: str, default_root: str) -> str:
    """The URL of the verified checkpoint ``resume_from`` names, if it fits ``spec``'s model.

    Raises NoSuchCheckpoint (with what to fix) when it does not exist, does not
    verify or holds another model.
    """
    if spec.mode == "script":
        raise NoSuchCheckpoint(
            "a script job keeps its own checkpoints: --resume-from takes ps-async and "
            "allreduce jobs"
        )
    store, manifest = locate(resume_from, spec.checkpoint.url or default_root)
    check_fits(manifest, tensor_specs(spec))
    check_optimizer(manifest, spec.optimizer.name)
    return store.url_of(manifest)


def new_job(
    spec: JobSpec, keys: Keys, now: float | None = None, resume_from: str = "", owner: str = ""
) -> tuple[str, list[Put]]:
    """A fresh job id and the writes that admit the job under it. A script counts its own
    steps: elasticd does not, so a script job has no total."""
    job_id = f"{spec.name}-{uuid.uuid4().hex[:6]}"
    now = time.time() if now is None else now
    record = JobRecord(
        job_id=job_id,
        name=spec.name,
        mode=spec.mode,
        state=PENDING,
        total_steps=spec.steps if spec.mode != "script" else 0,
        resume_from=resume_from,
        owner=owner,
        submitted_at=now,
        updated_at=now,
    )
    return job_id, [
        Put(keys.job_spec(job_id), spec.to_json().encode()),
        Put(keys.job_status(job_id), record.to_json()),
    ]


def admit(controller, spec: JobSpec, resume_from: str, owner: str) -> str:
    """Check the job, then write it under a fresh id (another one if the id was taken)."""
    check_buildable(spec)  # a task that cannot be built is refused now
    if resume_from:
        resume_from = check_resumable(spec, resume_from, controller.checkpoint_url)
    for _ in range(CONFLICT_RETRIES):
        job_id, ops = new_job(spec, controller.keys, resume_from=resume_from, owner=owner)
        try:
            controller.writer.create(job_id, ops)
        except Conflict:
            continue  # the id was taken: draw another
        log.info(
            "event=job_submitted job=%s mode=%s steps=%d owner=%s",
            job_id,
            spec.mode,
            spec.steps,
            owner or "-",
        )
        return job_id
    raise RuntimeError("no free job id after several tries; submit again")
