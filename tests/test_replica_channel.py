"""The replication channel on real PS servers: raw bytes in, a clear refusal for anything else.

Updates reach a backup over the channel (the copies stay equal: the replica
tests pin that); here, what a hostile or confused peer sends to the channel's
port changes nothing, gets an answer with a gRPC status code where it can, and
leaves the listener serving the primary's next update.
"""

from __future__ import annotations

import socket
import struct

import grpc
import pytest

from elasticd.rpc import ps_pb2
from elasticd.server.ps.replica_channel import MAGIC, TOKEN_BYTES
from tests.fixtures.ps import JOB, PSCluster
from tests.fixtures.replica_wire import assert_no_channel_threads_after_stop, closed, frame, reply
from tests.test_ps_replicas import assert_copies_equal, copies, step, two_servers
from tests.test_ps_service import mlp


def open_channel(ps_cluster, backup_ps, group: str, generation: int = 1):
    return ps_cluster.stub(backup_ps).OpenReplica(
        ps_pb2.OpenReplicaRequest(
            fence=ps_pb2.Fence(job_id=JOB, generation=generation, shard=group)
        ),
        timeout=10,
    )


def connect(port: int, hello: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(hello)
    return sock


def test_hostile_channel_input_is_refused_and_the_copies_stay_equal(ps_cluster: PSCluster):
    servers, placement, tier = two_servers(ps_cluster)
    model = mlp()
    step(model, tier, 0, 1)  # opens the channels: the copies are equal over them
    assert_copies_equal(servers, placement)
    group = placement.groups[0]
    primary_id, backup_id = placement.holders(group)
    backup_ps = next(s for s in servers if s.ps_id == backup_id)
    primary_ps = next(s for s in servers if s.ps_id == primary_id)
    _, held = copies(servers, group)
    before = held.version

    # Only a backup copy has a channel; a stale generation gets none.
    with pytest.raises(grpc.RpcError) as err:
        open_channel(ps_cluster, primary_ps, group)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a backup takes forwarded updates" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        open_channel(ps_cluster, backup_ps, group, generation=0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    nbytes = sum(h.nbytes for h in held.headers)
    fence = ps_pb2.Fence(job_id=JOB, generation=1, shard=group)
    out_of_order = frame(
        ps_pb2.ReplicateHeader(fence=fence, version=before + 5), nbytes, bytes(nbytes)
    )

    # No token, a made-up token, a used token: UNAUTHENTICATED, and the connection closed.
    opened = open_channel(ps_cluster, backup_ps, group)
    good = connect(opened.port, MAGIC + opened.token)
    good.sendall(out_of_order)  # answered: the token was taken
    assert reply(good)[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for hello in (
        b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20,
        MAGIC + bytes(TOKEN_BYTES),
        MAGIC + opened.token,
    ):
        with connect(opened.port, hello[: len(MAGIC) + TOKEN_BYTES]) as sock:
            code, message = reply(sock)
            assert code == grpc.StatusCode.UNAUTHENTICATED.value[0], message
            assert closed(sock)

    cases = [
        # (what is sent, status, message part, whether the channel stays open)
        (struct.pack("<IQ", 1 << 20, 0), "INVALID_ARGUMENT", "header of", False),
        (struct.pack("<IQ", 3, 0) + b"\xff\xff\xff", "INVALID_ARGUMENT", "does not parse", False),
        (
            frame(ps_pb2.ReplicateHeader(fence=ps_pb2.Fence(job_id="other", shard=group)), 0),
            "INVALID_ARGUMENT",
            "carries job",
            False,
        ),
        (frame(ps_pb2.ReplicateHeader(fence=fence, version=before), 1 << 40), "INVALID_ARGUMENT", "bytes, not", False),
        # Whole frames the shard refuses: the channel stays in step and open.
        (out_of_order, "INVALID_ARGUMENT", "applies to version", True),
        (
            frame(
                ps_pb2.ReplicateHeader(
                    fence=ps_pb2.Fence(job_id=JOB, generation=0, shard=group), version=before
                ),
                nbytes,
                bytes(nbytes),
            ),
            "FAILED_PRECONDITION",
            "generation",
            True,
        ),
    ]  # fmt: skip
    for sent, status, part, stays_open in cases:
        opened = open_channel(ps_cluster, backup_ps, group)
        with connect(opened.port, MAGIC + opened.token) as sock:
            sock.sendall(sent)
            code, message = reply(sock)
            assert code == getattr(grpc.StatusCode, status).value[0], (part, message)
            assert part in message
            if stays_open:
                sock.sendall(sent)  # the same again on the same connection: answered again
                assert reply(sock)[0] == code
            else:
                assert closed(sock)
    good.close()

    # Nothing of that reached the backup, and the primary's next update goes through.
    assert held.version == before
    step(model, tier, 1, 2)
    with held.lock:  # the backup steps under its lock after it answered
        assert held.version == before + 1
    assert_copies_equal(servers, placement)

    # A stopped PS leaves no channel thread behind, the primaries' open channels included.
    assert_no_channel_threads_after_stop(ps_cluster, servers)
