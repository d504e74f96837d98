"""The replication channel of a cluster with TLS: encrypted, and only PS may speak on it.

Two real PS servers on loopback, run with TLS in the test process as
``elasticd ps`` runs them (this process's settings), forward each update over
the channel inside TLS. Under mutual TLS a primary shows its PS certificate;
with the cluster token instead, it answers the backup's challenge. A plaintext
peer holding a valid one-time token and sending well-formed frames, and TLS
peers without a PS's identity, are refused and change nothing.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from elasticd.rpc import ps_pb2, ps_pb2_grpc
from elasticd.security.certs import Authority, make_authority
from elasticd.security.channels import open_channel
from elasticd.security.config import Security, current, use
from elasticd.security.identities import NODE_CERT
from elasticd.server.ps.replica_channel import MAGIC, ChannelClosed, ReplicaChannel
from elasticd.server.ps.replica_tls import PROOF_BYTES, ChannelSecurity
from tests.fixtures.ps import JOB, PS, PSCluster
from tests.fixtures.replica_wire import (
    assert_no_channel_threads_after_stop,
    closed,
    frame,
    raw_reply,
)
from tests.test_ps_replicas import assert_copies_equal, copies, step, two_servers
from tests.test_ps_service import mlp

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class TLSCluster:
    mode: str  # "mutual": PS certificates; "token": the cluster token
    ps: Security  # what every PS (and the in-process worker) runs with
    ca: Authority
    directory: Path

    def with_certificate(self, name: str, authority: Authority | None = None) -> Security:
        """The PS's settings, presenting a certificate named ``name`` instead."""
        issued = (authority or self.ca).issue(self.directory / name.replace(":", "_"), name, HOSTS)
        return replace(self.ps, tls_cert=str(issued.cert), tls_key=str(issued.key))


@pytest.fixture(params=["mutual", "token"])
def tls_cluster(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TLSCluster]:
    """This process runs as a PS of a cluster with TLS for the test, then as before."""
    ca = make_authority(tmp_path / "ca")
    # this process is every PS, their controller and the worker: a node certificate
    issued = ca.issue(tmp_path / "ps", NODE_CERT, HOSTS)
    settings = Security(tls_cert=str(issued.cert), tls_key=str(issued.key), tls_ca=str(ca.cert))
    if request.param == "mutual":
        settings = replace(settings, tls_client_auth=True)
    else:
        settings = replace(settings, cluster_token="the-cluster-token")
    previous = current()
    monkeypatch.setattr(os, "environ", dict(os.environ))  # use() exports to the environment
    use(settings)
    try:
        yield TLSCluster(request.param, settings, ca, tmp_path)
    finally:
        use(previous)


def open_replica(ps: PS, group: str) -> ps_pb2.OpenReplicaReply:
    """A one-time channel token, asked for as a member (over TLS, with this process's settings)."""
    with open_channel(ps.address) as channel:
        return ps_pb2_grpc.ParameterServerStub(channel).OpenReplica(
            ps_pb2.OpenReplicaRequest(fence=ps_pb2.Fence(job_id=JOB, generation=1, shard=group)),
            timeout=10,
        )


def replicated_pair(ps_cluster: PSCluster):
    servers, placement, tier = two_servers(ps_cluster)
    model = mlp()
    step(model, tier, 0, 1)  # opens the channels, inside TLS
    assert_copies_equal(servers, placement)
    group = placement.groups[0]
    backup_id = placement.holders(group)[1]
    backup = next(s for s in servers if s.ps_id == backup_id)
    return servers, placement, tier, model, group, backup


def test_replication_runs_over_tls_and_a_plaintext_peer_changes_nothing(
    tls_cluster: TLSCluster, ps_cluster: PSCluster
):
    servers, placement, tier, model, group, backup = replicated_pair(ps_cluster)
    for i in range(1, 4):
        step(model, tier, i, i + 1)
    assert_copies_equal(servers, placement)
    _, held = copies(servers, group)
    before = held.version
    nbytes = sum(h.nbytes for h in held.headers)
    update = frame(
        ps_pb2.ReplicateHeader(
            fence=ps_pb2.Fence(job_id=JOB, generation=1, shard=group), version=before + 1
        ),
        nbytes,
        b"\x01" * nbytes,
    )

    # A valid token and a frame the backup would apply, in plaintext: the TLS
    # handshake fails on the first bytes and the connection is closed unread.
    opened = open_replica(backup, group)
    with socket.create_connection(("127.0.0.1", opened.port), timeout=10) as sock:
        try:
            sock.sendall(MAGIC + opened.token + update)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before it all went out: refused as well
        assert closed(sock)
    assert held.version == before

    # The primary's next updates go through, over TLS, and the copies stay equal.
    for i in range(4, 6):
        step(model, tier, i, i + 1)
    with held.lock:
        assert held.version == before + 2
    assert_copies_equal(servers, placement)

    # A stopped PS leaves no TLS channel thread behind, its open channels included.
    assert_no_channel_threads_after_stop(ps_cluster, servers)


def test_a_tls_peer_that_is_not_a_ps_is_refused(tls_cluster: TLSCluster, ps_cluster: PSCluster):
    servers, placement, tier, model, group, backup = replicated_pair(ps_cluster)
    _, held = copies(servers, group)
    before = held.version
    nbytes = sum(h.nbytes for h in held.headers)
    update = frame(
        ps_pb2.ReplicateHeader(
            fence=ps_pb2.Fence(job_id=JOB, generation=1, shard=group), version=before
        ),
        nbytes,
        b"\x01" * nbytes,
    )

    def attempt(security: Security, answer: bytes | None = None) -> tuple[int, str]:
        """Open a channel as ``security`` with a valid token; the backup's refusal."""
        opened = open_replica(backup, group)
        sock = socket.create_connection(("127.0.0.1", opened.port), timeout=10)
        with ChannelSecurity.of(security).connect(sock, "127.0.0.1") as tls:
            code, challenge = raw_reply(tls)
            if not code:
                proof = ChannelSecurity.of(security).answer(challenge)
                tls.sendall(MAGIC + opened.token + (proof if answer is None else answer) + update)
                code, message = raw_reply(tls)
            else:
                message = challenge
            assert closed(tls)
            return code, message.decode()

    unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]
    stranger = make_authority(tls_cluster.directory / "stranger", "another CA")
    if tls_cluster.mode == "mutual":
        # A certificate of this CA that names an agent, a user, the old shared name.
        for name in ("elasticd-agent:n1", "user:alice", "node"):
            code, message = attempt(tls_cluster.with_certificate(name))
            assert code == unauthenticated and "does not name a parameter server" in message
        # The real primary's channel code says why it was refused.
        opened = open_replica(backup, group)
        with pytest.raises(ChannelClosed, match="UNAUTHENTICATED.*parameter server"):
            ReplicaChannel(
                "127.0.0.1",
                opened.port,
                opened.token,
                10,
                ChannelSecurity.of(tls_cluster.with_certificate("elasticd-agent:n1")),
            )
        # A PS certificate from another CA, or none: the handshake itself fails.
        for security in (
            tls_cluster.with_certificate("elasticd-ps", stranger),
            Security(tls_ca=tls_cluster.ps.tls_ca),
        ):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                attempt(security)
    else:
        # Without the cluster token, with another token, with the challenge's bytes echoed.
        for security, answer in (
            (Security(tls_ca=tls_cluster.ps.tls_ca), None),
            (replace(tls_cluster.ps, cluster_token="not-the-token"), None),
            (tls_cluster.ps, b"\x00" * PROOF_BYTES),
        ):
            code, message = attempt(security, answer)
            assert code == unauthenticated and "cluster token" in message
    # A primary does not forward to a backup whose certificate it cannot verify.
    opened = open_replica(backup, group)
    with pytest.raises(ssl.SSLCertVerificationError):
        ReplicaChannel(
            "127.0.0.1",
            opened.port,
            opened.token,
            10,
            ChannelSecurity.of(replace(tls_cluster.ps, tls_ca=str(stranger.cert))),
        )

    assert held.version == before
    step(model, tier, 1, 2)
    with held.lock:
        assert held.version == before + 1
    assert_copies_equal(servers, placement)
