"""A primary's link to its backup: one update forwarded per call, in order.

The primary calls the link under its shard lock, before it steps itself, so
updates reach the backup in the order the primary applies them, and a push
is acknowledged only once both copies applied it (see
:mod:`elasticd.server.ps.shard`). A backup that does not answer within
:data:`REPLICATE_TIMEOUT_S` fails the update on both: the worker sends its
push again once the controller has moved the group to live servers.

Updates travel over the backup's replication channel
(:mod:`.replica_channel`: raw bytes on a TCP connection, inside TLS when the
cluster has TLS: :mod:`.replica_tls`), opened on first use
and again after any failure; a backup without one (``OpenReplica``
unimplemented) gets them as a gRPC ``Replicate`` stream.
"""

from __future__ import annotations

import logging

import grpc
import torch

from elasticd.rpc import ps_pb2
from elasticd.rpc.limits import GRPC_OPTIONS
from elasticd.security.channels import open_channel
from elasticd.security.config import Security, current
from elasticd.server.ps.replica_channel import ChannelClosed, ReplicaChannel, status_name
from elasticd.server.ps.replica_tls import ChannelSecurity
from elasticd.server.ps.rules import Contributor
from elasticd.server.ps.shard import ReplicaUnavailable
from elasticd.wire import as_bytes, chunk, encode_chunk_frame, frame_serializer

log = logging.getLogger(__name__)

REPLICATE_TIMEOUT_S = 10.0  # one forwarded update; the push it carries waits this long at most
SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name


class BackupLink:
    """Forwards ``job_id``'s updates of ``group`` to the backup at ``address``,
    as the PS running with ``security`` (default: this process's settings)."""

    def __init__(
        self, job_id: str, group: str, address: str, security: Security | None = None
    ) -> None:
        self.job_id, self.group, self.address = job_id, group, address
        security = current() if security is None else security
        self._security = ChannelSecurity.of(security)
        self._channel = open_channel(address, security, options=GRPC_OPTIONS)
        self._replicate = self._channel.stream_unary(
            f"/{SERVICE}/Replicate",
            request_serializer=frame_serializer,
            response_deserializer=ps_pb2.ReplicateReply.FromString,
        )
        self._open = self._channel.unary_unary(
            f"/{SERVICE}/OpenReplica",
            request_serializer=ps_pb2.OpenReplicaRequest.SerializeToString,
            response_deserializer=ps_pb2.OpenReplicaReply.FromString,
        )
        self._socket: ReplicaChannel | None = None
        self._grpc_only = False  # the backup has no replication channel

    def __call__(
        self,
        generation: int,
        version: int,
        grads: list[torch.Tensor],
        contributors: list[Contributor],
    ) -> None:
        header = ps_pb2.ReplicateHeader(
            fence=ps_pb2.Fence(job_id=self.job_id, generation=generation, shard=self.group),
            version=version,
            workers=[w for w, _, _ in contributors],
            push_ids=[p for _, p, _ in contributors],
            batches=[b for _, _, b in contributors],
        )

        try:
            if self._grpc_only or not self._over_channel(header, grads):
                self._over_grpc(header, grads)
        except grpc.RpcError as exc:
            self._failed(version, exc.code().name, exc.details())
        except (OSError, ChannelClosed) as exc:
            self._drop_socket()
            self._failed(version, "UNAVAILABLE", f"replication channel: {exc}")

    def _over_channel(self, header: ps_pb2.ReplicateHeader, grads: list[torch.Tensor]) -> bool:
        """Send over the replication channel; False if the backup has none."""
        if self._socket is None:
            try:
                opened = self._open(
                    ps_pb2.OpenReplicaRequest(fence=header.fence), timeout=REPLICATE_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._grpc_only = True
                return False
            host = self.address.rsplit(":", 1)[0].strip("[]")
            self._socket = ReplicaChannel(
                host, opened.port, opened.token, REPLICATE_TIMEOUT_S, self._security
            )
        code, payload = self._socket.send(header, grads)
        if code:
            self._failed(header.version, status_name(code), payload.decode())
        return True

    def _over_grpc(self, header: ps_pb2.ReplicateHeader, grads: list[torch.Tensor]) -> None:
        def requests():
            yield ps_pb2.ReplicateRequest(header=header)
            for index, g in enumerate(grads):
                for offset, piece in chunk(as_bytes(g.contiguous())):
                    yield encode_chunk_frame(index, offset, piece)

        self._replicate(requests(), timeout=REPLICATE_TIMEOUT_S)

    def _failed(self, version: int, code: str, details: str):
        log.warning(
            "event=replicate_failed job=%s group=%s backup=%s version=%d code=%s detail=%s",
            self.job_id,
            self.group,
            self.address,
            version,
            code,
            details,
        )
        raise ReplicaUnavailable(
            f"job {self.job_id} group {self.group}: the backup at {self.address} did not "
            f"apply the update to version {version} ({code}: {details}); "
            "nothing was applied: push again once the group has a live backup"
        ) from None

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def close(self) -> None:
        self._drop_socket()
        self._channel.close()
