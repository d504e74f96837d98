"""JobService and TrainingCoordinator servicers: validate, call the controller, map errors."""

from __future__ import annotations

import logging
import threading

import grpc

from elasticd.checkpoint.locate import NoSuchCheckpoint
from elasticd.coord.etcd import EtcdError
from elasticd.jobspec import SWITCHABLE, SpecError, load_spec_yaml
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.security.gate import caller_identity
from elasticd.security.storage import StorageRefused
from elasticd.server.controller.admission import NotYours
from elasticd.server.controller.checkpoints import NotCheckpointable
from elasticd.server.controller.controller import Controller, NotLeader, SwitchRefused
from elasticd.server.controller.data_service import NotLeasable
from elasticd.server.controller.errors import Conflict
from elasticd.server.controller.progress import NotAMember
from elasticd.server.controller.rank_checkpoints import BadShardReport
from elasticd.server.controller.records import TERMINAL
from elasticd.server.controller.rendezvous import (
    NotRankZero,
    RendezvousBoard,
    StaleGeneration,
    UnknownJob,
)
from elasticd.server.controller.scaling import BadBounds, NotScalable
from elasticd.server.controller.status import changed, filter_errors, matches, status_message
from elasticd.server.controller.suspicion import BadPeerReport, StalePeerReport, peer_lost
from elasticd.server.controller.view import JobNotFound
from elasticd.serving import GRPC_THREADS
from elasticd.shape_probe.client import ProbeUnavailable
from elasticd.task import TaskError

log = logging.getLogger(__name__)

MAX_SPEC_BYTES = 1 << 20
WATCH_POLL_S = 0.5  # a watch looks at its job at least this often, and on every report
# Each WatchJob stream holds a handler thread; the rest are kept for every other call.
MAX_WATCHES = GRPC_THREADS // 2

__all__ = ["JobServiceServicer", "TrainingCoordinatorServicer", "status_message"]


def _abort_for(context, exc: Exception):
    if isinstance(exc, JobNotFound):
        context.abort(grpc.StatusCode.NOT_FOUND, f"no job with id {exc.args[0]!r}")
    if isinstance(exc, NotLeader):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, Conflict):
        context.abort(grpc.StatusCode.ABORTED, f"{exc}; try again")
    if isinstance(exc, ProbeUnavailable):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}")
    if isinstance(exc, EtcdError):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd unreachable: {exc}")
    raise exc


class JobServiceServicer(job_pb2_grpc.JobServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._watches = threading.BoundedSemaphore(MAX_WATCHES)

    def SubmitJob(self, request, context):
        if len(request.spec_yaml) > MAX_SPEC_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec: larger than 1 MiB")
        try:
            spec = load_spec_yaml(request.spec_yaml, request.base_dir or None)
        except SpecError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: {exc}")
        caller = caller_identity(context)
        try:
            job_id = self.controller.submit(
                spec, request.resume_from, caller.name, admin=caller.role == "admin"
            )
        except (StorageRefused, NotYours) as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
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
        errors = filter_errors(request.states, request.mode)
        if errors:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(errors))
        jobs = []
        for job_id in self.controller.job_ids():
            try:
                status = status_message(self.controller, job_id)
            except JobNotFound:
                continue
            if matches(status, request):
                jobs.append(status)
        return job_pb2.ListJobsReply(jobs=jobs)

    def WatchJob(self, request, context):
        if not self._watches.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_WATCHES} jobs are watched on this controller already; poll GetJob instead",
            )
        try:
            yield from self._watch(request.job_id, context)
        finally:
            # Also when the caller left: gRPC stops pulling from the stream, and closes it.
            self._watches.release()
            log.info(
                "event=watch_ended job=%s caller_active=%s", request.job_id, context.is_active()
            )

    def _watch(self, job_id: str, context):
        """Send the status whenever it changes; end after the job has ended, or as soon as
        the caller has gone (its handler thread is not held for nobody)."""
        last = None
        while context.is_active():
            if not self.controller.is_leader:
                # A standby's progress book is empty: the client opens the watch again
                # at whoever leads now.
                context.abort(grpc.StatusCode.UNAVAILABLE, "this controller is not leading")
            try:
                status = status_message(self.controller, job_id)
            except Exception as exc:
                _abort_for(context, exc)
            if changed(last, status):
                yield status
                last = status
            if status.state in TERMINAL:
                return
            self.controller.progress.wait_for_report(WATCH_POLL_S)

    def ScaleJob(self, request, context):
        try:
            self.controller.scale(request.job_id, request.min_workers, request.max_workers)
            return status_message(self.controller, request.job_id)
        except BadBounds as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotScalable as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            _abort_for(context, exc)

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


def rank_zero(controller: Controller, job_id: str, generation: int) -> str | None:
    """The worker holding rank 0 of the job's sealed generation, if that is ``generation``."""
    try:
        sealed = controller.snapshot(job_id).generation
    except KeyError:  # JobNotFound
        return None
    if sealed is None or sealed.number != generation:
        return None
    return next((m.worker_id for m in sealed.members if m.rank == 0), None)


class TrainingCoordinatorServicer(job_pb2_grpc.TrainingCoordinatorServicer):
    def __init__(self, controller: Controller, board: RendezvousBoard | None = None) -> None:
        self.controller = controller
        self.board = board or RendezvousBoard(
            lambda job: sealed_generation(controller, job),
            lambda job, generation: rank_zero(controller, job, generation),
        )

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
        except NotRankZero as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
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
