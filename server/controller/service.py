"""JobService and TrainingCoordinator servicers: validate, call the controller, map errors."""

from __future__ import annotations

import logging
import math

import grpc

from elasticd.checkpoint.locate import NoSuchCheckpoint
from elasticd.coord.etcd import EtcdError
from elasticd.jobspec import SWITCHABLE, SpecError, load_spec_yaml
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.server.controller.checkpoints import NotCheckpointable
from elasticd.server.controller.controller import Controller, NotLeader, SwitchRefused
from elasticd.server.controller.data_service import NotLeasable
from elasticd.server.controller.errors import Conflict
from elasticd.server.controller.progress import NotAMember
from elasticd.server.controller.rank_checkpoints import BadShardReport
from elasticd.server.controller.rendezvous import RendezvousBoard, StaleGeneration, UnknownJob
from elasticd.server.controller.suspicion import BadPeerReport, StalePeerReport, peer_lost
from elasticd.server.controller.view import JobNotFound
from elasticd.task import TaskError

log = logging.getLogger(__name__)

MAX_SPEC_BYTES = 1 << 20


def _abort_for(context, exc: Exception):
    if isinstance(exc, JobNotFound):
        context.abort(grpc.StatusCode.NOT_FOUND, f"no job with id {exc.args[0]!r}")
    if isinstance(exc, NotLeader):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, Conflict):
        context.abort(grpc.StatusCode.ABORTED, f"{exc}; try again")
    if isinstance(exc, EtcdError):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd unreachable: {exc}")
    raise exc


def status_message(controller: Controller, job_id: str) -> job_pb2.JobStatus:
    record, gen, progress = controller.status(job_id)
    placement = controller.snapshot(job_id).placement
    shown = placement is not None and record.mode == "ps-async"
    held = placement.bytes_per_ps() if shown else {}
    backups = placement.backup_bytes_per_ps() if shown else {}
    workers = []
    if gen is not None:
        for m in gen.members:
            p = progress.get(m.worker_id)
            workers.append(
                job_pb2.WorkerStatus(
                    worker_id=m.worker_id,
                    node_id=m.node_id,
                    rank=m.rank,
                    state="RUNNING" if p and not p.finished else ("FINISHED" if p else "STARTING"),
                    step=p.step if p else 0,
                    loss=p.loss if p else math.nan,
                )
            )
    return job_pb2.JobStatus(
        job_id=record.job_id,
        name=record.name,
        state=record.state,
        mode=record.mode,
        generation=record.generation,
        workers=workers,
        step=record.step,
        total_steps=record.total_steps,
        loss=record.loss,
        first_loss=record.first_loss,
        checkpoint=record.checkpoint,
        message=record.message,
        submitted_at=record.submitted_at,
        updated_at=record.updated_at,
        ps=[
            job_pb2.PSHolding(ps_id=p, bytes=n, backup_bytes=backups.get(p, 0))
            for p, n in sorted(held.items())
        ],
        restored_from=record.restored_from,
        restored_step=record.restored_step,
        updates_lost=record.updates_lost,
    )


class JobServiceServicer(job_pb2_grpc.JobServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def SubmitJob(self, request, context):
        if len(request.spec_yaml) > MAX_SPEC_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec: larger than 1 MiB")
        try:
            spec = load_spec_yaml(request.spec_yaml, request.base_dir or None)
        except SpecError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: {exc}")
        try:
            job_id = self.controller.submit(spec, request.resume_from)
        except TaskError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: task: {exc}")
        except NoSuchCheckpoint as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"resume-from: {exc}")
        except Exception as exc:
            _abort_for(context, exc)
        return job_pb2.SubmitJobReply(job_id=job_id)

    def GetJob(self, request, context):
        try:
            return status_message(self.controller, request.job_id)
        except Exception as exc:
            _abort_for(context, exc)

    def ListJobs(self, request, context):
        jobs = []
        for job_id in self.controller.job_ids():
            try:
                jobs.append(status_message(self.controller, job_id))
            except JobNotFound:
                continue
        return job_pb2.ListJobsReply(jobs=jobs)

    def CancelJob(self, request, context):
        try:
            self.controller.cancel(request.job_id)
            return status_message(self.controller, request.job_id)
        except Exception as exc:
            _abort_for(context, exc)

    def CheckpointJob(self, request, context):
        try:
            self.controller.checkpoint(request.job_id)
            return status_message(self.controller, request.job_id)
        except NotCheckpointable as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            _abort_for(context, exc)

    def SwitchMode(self, request, context):
        if request.mode not in SWITCHABLE:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"mode: a running job switches to one of {', '.join(SWITCHABLE)}, "
                f"got {request.mode!r}",
            )
        try:
            self.controller.switch(request.job_id, request.mode)
            return status_message(self.controller, request.job_id)
        except SwitchRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            _abort_for(context, exc)


def sealed_generation(controller: Controller, job_id: str) -> int | None:
    """The job's sealed generation number (0 before the first seal); None: no such job."""
    try:
        snap = controller.snapshot(job_id)
    except KeyError:  # JobNotFound
        return None
    return snap.generation.number if snap.generation is not None else 0


class TrainingCoordinatorServicer(job_pb2_grpc.TrainingCoordinatorServicer):
    def __init__(self, controller: Controller, board: RendezvousBoard | None = None) -> None:
        self.controller = controller
        self.board = board or RendezvousBoard(lambda job: sealed_generation(controller, job))

    def ReportProgress(self, request, context):
        try:
            stop, checkpoint = self.controller.report(
                request.job_id,
                request.worker_id,
                request.generation,
                request.step,
                request.loss,
                request.finished,
            )
        except NotAMember as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            _abort_for(context, exc)
        return job_pb2.ProgressAck(stop=stop, checkpoint=checkpoint)

    def ReportShard(self, request, context):
        try:
            committed = self.controller.rank_checkpoints.written(self.controller, request)
        except BadShardReport as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            _abort_for(context, exc)
        return job_pb2.ShardWrittenAck(committed=committed)

    def ReportPeerLost(self, request, context):
        try:
            confirmed, healthy = peer_lost(
                self.controller,
                request.job_id,
                request.generation,
                request.worker_id,
                list(request.suspects),
            )
        except BadPeerReport as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StalePeerReport as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            _abort_for(context, exc)
        return job_pb2.PeerLostReply(confirmed=confirmed, healthy=healthy)

    def LeaseData(self, request, context):
        if not request.holder:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "holder: name the asking process")
        for r in request.finished:
            if r.start < 0 or r.end <= r.start:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"finished: [{r.start}, {r.end}) is not a range of batch indices",
                )
        try:
            return self.controller.data.lease(self.controller, request)
        except NotLeasable as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            _abort_for(context, exc)

    def PublishRendezvous(self, request, context):
        try:
            self.board.publish(
                request.job_id, request.generation, request.address, request.worker_id
            )
        except UnknownJob:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job with id {request.job_id!r}")
        except StaleGeneration as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            _abort_for(context, exc)
        log.info(
            "event=rendezvous_published job=%s generation=%d worker=%s address=%s",
            request.job_id,
            request.generation,
            request.worker_id,
            request.address,
        )
        return job_pb2.RendezvousAck()

    def LookupRendezvous(self, request, context):
        try:
            address = self.board.lookup(request.job_id, request.generation)
        except UnknownJob:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job with id {request.job_id!r}")
        except StaleGeneration as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            _abort_for(context, exc)
        if address is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"generation {request.generation} of job {request.job_id} has not published "
                "a rendezvous yet",
            )
        return job_pb2.RendezvousAddress(
            job_id=request.job_id, generation=request.generation, address=address
        )
