"""The controller's side of a job's PS tier: snapshots, shard info and figures,
and whole-state export and import (switches, restores, failovers).

A mixin of :class:`elasticd.ps_client.PSTier`: the same channels and the same
per-group fan-out as the worker's pulls and pushes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import grpc

from elasticd.checkpoint.manifest import CorruptShard, ShardRecord
from elasticd.frames import CHUNK_BYTES
from elasticd.rpc import ps_pb2, ps_pb2_grpc

# Exporting and importing state handles tensors: the shard codec (torch) is imported
# there, so info and snapshot need no torch.

RPC_TIMEOUT_S = 60.0  # one whole shard in or out


class TierState:
    def snapshot(self, url: str, step: int) -> dict[str, ps_pb2.SnapshotReply]:
        """Each group's primary writes the group to the checkpoint, named after the group."""
        return self._each(
            lambda g: self._stubs[g].Snapshot(
                ps_pb2.SnapshotRequest(fence=self._fence(g), url=url, name=g, step=step),
                timeout=RPC_TIMEOUT_S,
            )
        )

    def info(self) -> dict[str, ps_pb2.ShardInfoReply]:
        """Each group's primary copy: generation, version, bytes, role."""
        return self._each(
            lambda g: self._stubs[g].ShardInfo(
                ps_pb2.ShardInfoRequest(job_id=self.job_id, shard=g), timeout=10
            )
        )

    def stats(self) -> dict[str, ps_pb2.JobStats]:
        """Each group's figures on its primary: traffic, push outcomes, staleness, step time."""

        def one(g: str) -> ps_pb2.JobStats:
            reply = self._stubs[g].Stats(ps_pb2.StatsRequest(job_id=self.job_id), timeout=10)
            return next(j for j in reply.jobs if j.shard == g or len(reply.jobs) == 1)

        return self._each(one)

    def export_state(self) -> dict[str, tuple[dict, dict, dict]]:
        """Every group's (tensors by slice key, optimizer state_dict, meta), for a switch."""
        from elasticd.checkpoint.serialize import decode_shard

        def one(g: str):
            replies = self._stubs[g].ExportShard(
                ps_pb2.ExportShardRequest(fence=self._fence(g)), timeout=RPC_TIMEOUT_S
            )
            return decode_shard(b"".join(r.data for r in replies))

        return self._each(one)

    def _shard_header(
        self, g: str, metas: list, optimizer: str, optimizer_kwargs: dict, max_staleness: int
    ) -> ps_pb2.InitShardHeader:
        """The header that makes group ``g``'s shard: its tensors and optimizer."""
        return ps_pb2.InitShardHeader(
            fence=self._fence(g),
            tensors=metas,
            optimizer=ps_pb2.OptimizerConfig(
                name=optimizer, kwargs_json=json.dumps(optimizer_kwargs)
            ),
            max_staleness=max_staleness,
        )

    def _copies_in_order(self, g: str, header: ps_pb2.InitShardHeader):
        """Group ``g``'s copies, backup first, with ``header`` set for each one's role."""
        primary, backup = self._holders[g]
        for ps_id in filter(None, (backup, primary)):
            header.backup = ps_id == backup
            header.backup_address = self.addresses[backup] if backup and not header.backup else ""
            yield ps_id

    def import_state(
        self,
        parts: Mapping[str, tuple[dict, dict, list[str]]],
        optimizer: str,
        optimizer_kwargs: dict,
        max_staleness: int,
        workers: int,
        max_version: int,
        version: int,
    ) -> dict[str, tuple[str, str]]:
        """Replace every group with ``parts[group]`` = (tensors, optimizer state, slice keys),
        on its backup first (if any), then on its primary.

        Returns, per group, (digest of what was sent, digest of what the copies hold:
        the backup's when it differs from the primary's).
        """
        from elasticd.checkpoint.serialize import encode_shard, state_digest
        from elasticd.wire import dtype_name

        def one(g: str) -> tuple[str, str]:
            tensors, state, keys = parts[g]
            primary, backup = self._holders[g]
            metas = [
                ps_pb2.TensorMeta(
                    key=k, dtype=dtype_name(tensors[k].dtype), shape=tuple(tensors[k].shape)
                )
                for k in keys
            ]
            header = self._shard_header(g, metas, optimizer, optimizer_kwargs, max_staleness)
            header.workers, header.max_version = workers, max_version
            data = encode_shard(
                tensors,
                {"state": state, "param_groups": [{"params": list(range(len(keys)))}]},
                {"keys": keys, "version": version},
            )

            held = {}
            for ps_id in self._copies_in_order(g, header):
                held[ps_id] = import_bytes(self._ps_stubs[ps_id], header, version, data)
            sent = state_digest(tensors, state, keys)
            return sent, next((d for d in held.values() if d != sent), held[primary])

        return self._each(one)

    def restore_from(
        self,
        sources: Mapping[str, ShardRecord],
        url: str,
        optimizer: str,
        optimizer_kwargs: dict,
        max_staleness: int,
        workers: int,
        max_version: int,
        version: int | Mapping[str, int],
        checkpoint: tuple[str, int],
    ) -> dict[str, str]:
        """Each group's copies read the stored shard ``sources[group]`` of the
        checkpoint ``checkpoint`` = (job id, step) under ``url`` themselves, backup first.

        The stored shard must hold exactly the group's slices. Returns the digest each
        group's primary holds; raises CorruptShard when a PS finds the stored bytes differ
        from their record, ValueError when the copies of a group hold different state.
        ``version`` is every group's version after the restore, or each group's.
        """
        job, step = checkpoint

        def one(g: str) -> str:
            primary, backup = self._holders[g]
            record = sources[g]
            metas = [
                ps_pb2.TensorMeta(key=s.key, dtype=s.dtype, shape=s.shape) for s in self._slices[g]
            ]
            header = self._shard_header(g, metas, optimizer, optimizer_kwargs, max_staleness)
            header.workers, header.max_version = workers, max_version
            held = {}
            for ps_id in self._copies_in_order(g, header):
                request = ps_pb2.RestoreShardRequest(
                    header=ps_pb2.ImportShardHeader(
                        shard=header,
                        version=version[g] if isinstance(version, Mapping) else version,
                    ),
                    url=url,
                    job_id=job,
                    step=step,
                    name=record.name,
                    path=record.path,
                    sha256=record.sha256,
                    size=record.size,
                )
                try:
                    reply = self._ps_stubs[ps_id].RestoreShard(request, timeout=RPC_TIMEOUT_S)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.DATA_LOSS:
                        raise CorruptShard(f"{ps_id}: {exc.details()}") from None
                    raise
                held[ps_id] = reply.digest
            if len(set(held.values())) != 1:
                raise ValueError(f"the copies of group {g} hold different state: {held}")
            return held[primary]

        return self._each(one)


def import_bytes(
    stub: ps_pb2_grpc.ParameterServerStub,
    header: ps_pb2.InitShardHeader,
    version: int,
    data: bytes,
) -> str:
    """ImportShard ``data`` (an encoded shard) at ``version``; the digest the PS now holds."""

    def requests():
        yield ps_pb2.ImportShardRequest(
            header=ps_pb2.ImportShardHeader(shard=header, version=version)
        )
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            yield ps_pb2.ImportShardRequest(
                bytes=ps_pb2.ShardBytes(data=bytes(view[offset : offset + CHUNK_BYTES]))
            )

    return stub.ImportShard(requests(), timeout=RPC_TIMEOUT_S).digest
