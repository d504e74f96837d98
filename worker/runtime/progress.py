"""Reporting training progress to the controller over gRPC (never through etcd)."""

from __future__ import annotations

import logging
import math

import grpc

from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.security.channels import open_channel

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 5.0


class ProgressReporter:
    def __init__(self, controller: str, job_id: str, worker_id: str, rank: int) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.rank = rank
        self._address = ""
        self._channel: grpc.Channel | None = None
        self.retarget(controller)

    def retarget(self, controller: str) -> None:
        if controller == self._address:
            return
        if self._channel is not None:
            self._channel.close()
        self._address = controller
        self._channel = open_channel(controller)
        self._stub = job_pb2_grpc.TrainingCoordinatorStub(self._channel)

    @property
    def stub(self) -> job_pb2_grpc.TrainingCoordinatorStub:
        """The coordinator of the current controller (other calls share the channel)."""
        return self._stub

    def report(
        self, generation: int, step: int, loss: float, finished: bool = False
    ) -> job_pb2.ProgressAck:
        """Send one report; the controller's answer (``stop``: this job is over;
        ``checkpoint``: an allreduce job is to take one).

        A controller that does not answer (fail-over in progress) costs a
        warning and an empty answer, never the training run.
        """
        try:
            return self._stub.ReportProgress(
                job_pb2.ProgressReport(
                    job_id=self.job_id,
                    generation=generation,
                    worker_id=self.worker_id,
                    rank=self.rank,
                    step=step,
                    loss=loss if not math.isnan(loss) else float("nan"),
                    finished=finished,
                ),
                timeout=REPORT_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            log.warning(
                "event=report_failed job=%s worker=%s code=%s",
                self.job_id,
                self.worker_id,
                exc.code(),
            )
            return job_pb2.ProgressAck()

    def shard_written(
        self, generation: int, rank: int, world: int, step: int, position: int, url: str, record
    ) -> bool:
        """Tell the controller this rank's checkpoint slice is stored; True if that completed
        the checkpoint. A controller that does not answer costs the checkpoint, not training."""
        try:
            ack = self._stub.ReportShard(
                job_pb2.ShardWritten(
                    job_id=self.job_id,
                    worker_id=self.worker_id,
                    generation=generation,
                    rank=rank,
                    world_size=world,
                    step=step,
                    position=position,
                    url=url,
                    name=record.name,
                    path=record.path,
                    sha256=record.sha256,
                    size=record.size,
                ),
                timeout=REPORT_TIMEOUT_S,
            )
            return ack.committed
        except grpc.RpcError as exc:
            log.warning(
                "event=shard_report_failed job=%s worker=%s step=%d code=%s detail=%s",
                self.job_id,
                self.worker_id,
                step,
                exc.code(),
                exc.details(),
            )
            return False

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def peer_lost(self, generation: int, suspects: tuple[str, ...]) -> None:
        """Name the peers a broken collective lost; the controller checks with their agents
        and leaves out those whose agent does not answer, before their leases expire."""
        try:
            reply = self._stub.ReportPeerLost(
                job_pb2.PeerLostReport(
                    job_id=self.job_id,
                    generation=generation,
                    worker_id=self.worker_id,
                    suspects=list(suspects),
                ),
                timeout=REPORT_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            log.info(
                "event=peer_report_failed job=%s worker=%s generation=%d code=%s detail=%s",
                self.job_id,
                self.worker_id,
                generation,
                exc.code(),
                exc.details(),
            )
            return
        log.info(
            "event=peer_reported job=%s worker=%s generation=%d confirmed=%s healthy=%s",
            self.job_id,
            self.worker_id,
            generation,
            ",".join(reply.confirmed) or "-",
            ",".join(reply.healthy) or "-",
        )
