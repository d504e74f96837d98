"""Admitting a job: learn its parameters' shapes, then write its spec and first record.

The shapes come from the task probe (:mod:`.shapes`, :mod:`elasticd.shape_probe`),
which builds the model on the ``meta`` device in a sandboxed process: a task
that cannot be built is refused at submit, not discovered at placement, and
its code never runs in the controller.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from elasticd.checkpoint.locate import (
    NoSuchCheckpoint,
    check_fits,
    check_optimizer,
    locate,
    split_checkpoint_url,
)
from elasticd.coord.etcd import Put
from elasticd.coord.keys import Keys
from elasticd.jobspec import JobSpec
from elasticd.placement import TensorSpec
from elasticd.security.storage import StoragePolicy
from elasticd.server.controller.errors import Conflict
from elasticd.server.controller.records import PENDING, JobRecord

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 5  # a user request retries this often when the job changed under it


class NotYours(PermissionError):
    """A caller named another user's job or checkpoint to resume from."""


def check_storage(policy: StoragePolicy, spec: JobSpec, resume_from: str = "") -> None:
    """Raise StorageRefused, naming the field, if the job names storage outside ``policy``."""
    policy.check("checkpoint.url", spec.checkpoint.url)
    policy.check("tensorboard", spec.tensorboard, local=True)  # the controller opens a path
    if split_checkpoint_url(resume_from.strip()) is not None:
        policy.check("resume_from", resume_from.strip())
    # A job id resumes from under checkpoint.url (or the controller's own root): checked above.


def check_resume_owner(
    resume_from: str, caller: str, admin: bool, owner_of: Callable[[str], str | None]
) -> None:
    """Raise NotYours unless ``caller`` owns the job ``resume_from`` names (an admin may
    resume from any job). A checkpoint URL names the job whose id it lies under."""
    ref = resume_from.strip()
    parts = split_checkpoint_url(ref)
    job_id = parts[1] if parts is not None else ref
    if admin or not job_id or (parts is None and ("/" in ref or ":" in ref)):
        return  # an admin; or no job named at all, which locate() refuses
    owner = owner_of(job_id)
    if owner == caller:
        return
    job_id = job_id if len(job_id) <= 128 else job_id[:128] + "..."  # shown in the error
    if owner is None:
        problem = f"job {job_id} has no record saying whose it is: only an admin may resume from it"
    else:
        problem = (
            f"job {job_id} belongs to {owner or 'nobody'}, not to {caller}: only a job's "
            "owner or an admin may resume from it or its checkpoints"
        )
    raise NotYours(f"resume_from: {problem}")


def check_resumable(
    spec: JobSpec, tensors: list[TensorSpec] | None, resume_from: str, default_root: str
) -> str:
    """The URL of the verified checkpoint ``resume_from`` names, if it fits ``spec``'s model.

    Raises NoSuchCheckpoint (with what to fix) when it does not exist, does not
    verify or holds another model.
    """
    if spec.mode == "script" or tensors is None:
        raise NoSuchCheckpoint(
            "a script job keeps its own checkpoints: --resume-from takes ps-async and "
            "allreduce jobs"
        )
    store, manifest = locate(resume_from, spec.checkpoint.url or default_root)
    check_fits(manifest, tensors)
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


def admit(controller, spec: JobSpec, resume_from: str, owner: str, admin: bool = False) -> str:
    """Check the job, then write it under a fresh id (another one if the id was taken).

    Storage and ownership first: a refused job runs no task probe and touches no storage.
    """
    check_storage(controller.storage, spec, resume_from)
    if resume_from:
        check_resume_owner(resume_from, owner, admin, controller.owner_of)
    tensors = controller.shapes.at_submit(spec)  # a task that cannot be built is refused now
    if resume_from:
        resume_from = check_resumable(spec, tensors, resume_from, controller.checkpoint_url)
    for _ in range(CONFLICT_RETRIES):
        job_id, ops = new_job(spec, controller.keys, resume_from=resume_from, owner=owner)
        ops += controller.shapes.admission_ops(job_id, tensors)
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
