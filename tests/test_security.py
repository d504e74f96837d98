"""Closed by default: TLS, mutual TLS, tokens and roles, against real servers.

One local cluster runs closed for the whole module: a CA and certificates made
here, mutual TLS on every port, a cluster token for members, JobService tokens
for three users, and an etcd with TLS, client certificates and authentication
on. The cheaper checks use in-process servers with their own settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasticd.client import JobClient
from elasticd.coord.access import EtcdRole, Grant
from elasticd.coord.etcd import EtcdClient, EtcdError, EtcdRefused
from elasticd.local import EtcdServer
from elasticd.retry import wait_until
from elasticd.rpc import job_pb2, job_pb2_grpc, ps_pb2, ps_pb2_grpc
from elasticd.security import Security
from elasticd.security.channels import open_channel
from elasticd.security.config import SecurityError, resolve
from elasticd.security.local_pki import make_local_pki
from elasticd.security.tokens import parse_tokens
from elasticd.server.ps.messages import SERVICE
from tests.fixtures.cluster import closed_cluster
from tests.jobs import spec_yaml

pytestmark = pytest.mark.slow

USERS = {"root": "admin", "alice": "submit", "bob": "submit", "auditor": "read"}


@pytest.fixture(scope="module")
def closed(tmp_path_factory):
    """A closed local cluster: 1 controller, 1 PS, 1 agent; etcd with TLS and auth."""
    base = tmp_path_factory.mktemp("closed")
    with closed_cluster(base, USERS) as c:
        yield c


def job_stub(address: str, security: Security) -> tuple[grpc.Channel, job_pb2_grpc.JobServiceStub]:
    channel = open_channel(address, security, caller="user")
    return channel, job_pb2_grpc.JobServiceStub(channel)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def submit(address: str, security: Security, **fields) -> str:
    channel, stub = job_stub(address, security)
    with channel:
        reply = stub.SubmitJob(job_pb2.SubmitJobRequest(spec_yaml=spec_yaml(**fields)), timeout=60)
    return reply.job_id


def test_a_submit_without_a_token_is_unauthenticated(closed):
    channel, stub = job_stub(closed.leader(), closed.client_security(user=None))
    with channel:
        request = job_pb2.SubmitJobRequest(spec_yaml=spec_yaml())
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitJob(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in info.value.details()
        wrong = closed.client_security(user=None).__class__(
            **{**closed.client_security(user=None).__dict__, "token": "not-a-token"}
        )
    channel, stub = job_stub(closed.leader(), wrong)
    with channel:
        assert code_of(lambda: stub.ListJobs(job_pb2.ListJobsRequest(), timeout=30)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_roles_and_owners_decide_who_may_change_a_job(closed):
    leader = closed.leader()
    job = submit(leader, closed.client_security("alice"), steps=100000)
    cancel = job_pb2.CancelJobRequest(job_id=job)
    # read may look, not cancel
    channel, stub = job_stub(leader, closed.client_security("auditor"))
    with channel:
        assert stub.GetJob(job_pb2.GetJobRequest(job_id=job), timeout=30).job_id == job
        assert code_of(lambda: stub.CancelJob(cancel, timeout=30)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert code_of(
            lambda: stub.SubmitJob(job_pb2.SubmitJobRequest(spec_yaml=spec_yaml()), timeout=30)
        ) == (grpc.StatusCode.PERMISSION_DENIED)
    # another submitter may not cancel alice's job
    channel, stub = job_stub(leader, closed.client_security("bob"))
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.CancelJob(cancel, timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "alice" in info.value.details()
    channel, stub = job_stub(leader, closed.client_security("alice"))
    with channel:
        assert stub.GetJob(job_pb2.GetJobRequest(job_id=job), timeout=30).state != "CANCELLED"
    # its owner may; so may an admin (here: the owner)
    client = JobClient(
        etcd=closed.etcd, prefix=closed.prefix, security=closed.client_security("alice")
    )
    try:
        assert client.cancel(job).state == "CANCELLED"
    finally:
        client.close()


def test_a_client_without_a_valid_certificate_cannot_connect(closed, tmp_path):
    leader = closed.leader()
    admin = closed.client_security("root")
    no_certificate = Security(tls_ca=admin.tls_ca, token=admin.token)
    channel, stub = job_stub(leader, no_certificate)
    with channel:
        assert code_of(lambda: stub.ListJobs(job_pb2.ListJobsRequest(), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    stranger = make_local_pki(tmp_path / "stranger")  # a certificate from another CA
    foreign = Security(
        tls_ca=admin.tls_ca,
        tls_cert=str(stranger.certificates["controller"].cert),
        tls_key=str(stranger.certificates["controller"].key),
        token=admin.token,
    )
    channel, stub = job_stub(leader, foreign)
    with channel:
        assert code_of(lambda: stub.ListJobs(job_pb2.ListJobsRequest(), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_a_plaintext_client_cannot_reach_a_tls_server(closed):
    admin = closed.client_security("root")
    plaintext = Security(token=admin.token)
    channel, stub = job_stub(closed.leader(), plaintext)
    with channel:
        assert code_of(lambda: stub.ListJobs(job_pb2.ListJobsRequest(), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    ps_address = closed.addresses()["ps-0"]
    with grpc.insecure_channel(ps_address) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        assert code_of(lambda: stub.Stats(ps_pb2.StatsRequest(), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_a_training_job_runs_end_to_end_with_tls_and_tokens(closed):
    client = JobClient(
        etcd=closed.etcd, prefix=closed.prefix, security=closed.client_security("bob")
    )
    try:
        job = client.submit_yaml(spec_yaml(steps=60))
        status = client.wait(job, timeout=240)
        assert status.state == "COMPLETED", status
        assert status.step >= 60
        assert status.loss < status.first_loss
    finally:
        client.close()


def test_health_is_open_and_says_serving(closed):
    admin = closed.client_security(user=None)
    with open_channel(closed.leader(), admin, caller="user") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "elasticd.job.JobService", "elasticd.job.TrainingCoordinator"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_etcd_with_tls_and_auth_refuses_what_it_should(closed):
    keys = closed.keys
    # a daemon's certificate is its etcd credential: etcd's user is its common name
    good = EtcdClient(closed.etcd, security=closed.pki.daemon("controller"))
    try:
        probe, leased = keys.assignment("probe-node", "probe"), keys.assignment("probe-node", "l")
        good.put(probe, b"1")
        assert good.get(probe).value == b"1"
        lease = good.grant_lease(5)
        good.put(leased, b"2", lease=lease)
        good.revoke_lease(lease)
        assert good.get(leased) is None
        good.delete(probe)
    finally:
        good.close()
    reader = closed.client_security("alice")
    wrong = Security(**{**reader.__dict__, "etcd_password": "wrong"})
    with pytest.raises(EtcdRefused, match="elasticd-client"):
        EtcdClient(closed.etcd, security=wrong)
    # a certificate that names no etcd user gets nothing: the job's, a user's
    for stem in ("job", "user-alice"):
        cert = closed.pki.certificates[stem]
        anonymous = Security(
            etcd_ca=reader.etcd_ca, etcd_cert=str(cert.cert), etcd_key=str(cert.key)
        )
        client = EtcdClient(closed.etcd, security=anonymous)
        try:
            with pytest.raises(EtcdRefused):
                client.get(keys.election + "probe")
        finally:
            client.close()
    plain = EtcdClient(closed.etcd, timeout=2, security=Security())
    try:
        with pytest.raises(EtcdError):
            plain.get(keys.election + "probe")
    finally:
        plain.close()


def test_an_etcd_auth_token_that_expires_is_renewed(tmp_path):
    pki = make_local_pki(tmp_path / "tls")
    user, ca = pki.certificates["user-admin"], str(pki.authority.cert)
    server = EtcdServer.on_tls(tmp_path / "etcd", pki, extra_args=("--auth-token-ttl", "1"))
    server.start()
    c = Security(
        etcd_ca=ca,
        etcd_cert=str(user.cert),
        etcd_key=str(user.key),
        etcd_user="writer",
        etcd_password="pw",
    )
    client = probe = None
    try:
        writer = EtcdRole("writer", (Grant("/", write=True),), password=True)
        server.enable_auth({"writer": writer}, {"root": "root-pw", "writer": "pw"})
        client = EtcdClient(server.endpoint, security=c)
        probe = EtcdClient(server.endpoint, security=c)
        client.put("/k", b"1")
        seen: list[tuple[str, bytes]] = []
        errors: list[Exception] = []
        # A watch opened before the token expires keeps delivering after it has.
        cancel = client.watch_prefix(
            "/w/", client.get("/k").mod_revision + 1,
            lambda events, rev: seen.extend((e.key, e.value) for e in events), errors.append,
        )  # fmt: skip

        def probe_token_expired() -> bool:  # the library's own call: nothing renews it
            try:
                probe._client.get("/k")
                return False
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAUTHENTICATED

        # each try uses the token, which restarts its TTL: try less often than the TTL
        wait_until(probe_token_expired, 30, "etcd to drop an idle auth token", interval=1.5)
        assert client.get("/k").value == b"1"  # our client got a new token, not an error
        client.put("/w/after", b"2")
        wait_until(lambda: ("/w/after", b"2") in seen, 30, "the open watch to see the put")
        assert errors == []
        cancel()
    finally:
        for x in (client, probe):
            if x is not None:
                x.close()
        server.stop()


# -- in-process servers: members only, settings --------------------------------


def test_internal_services_take_only_members(token_ps):
    address, pki = token_ps
    ps = pki.daemon("ps")
    tls_only = Security(tls_ca=ps.tls_ca)
    with open_channel(address, tls_only) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Stats(ps_pb2.StatsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # a user's token is not the cluster token
        user = Security(tls_ca=ps.tls_ca, cluster_token=pki.tokens["admin"])
    with open_channel(address, user) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        assert code_of(lambda: stub.Stats(ps_pb2.StatsRequest(), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    member = Security(tls_ca=ps.tls_ca, cluster_token=ps.cluster_token)
    with open_channel(address, member) as channel:
        ps_pb2_grpc.ParameterServerStub(channel).Stats(ps_pb2.StatsRequest(), timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=10
            ).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def test_a_daemon_on_a_public_address_without_tls_refuses_to_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "elasticd", "ps", "--host", "0.0.0.0", "--etcd", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "without TLS" in result.stderr and "--insecure" in result.stderr


def test_settings_come_from_file_environment_and_flags_and_name_what_is_wrong(tmp_path):
    pki = make_local_pki(tmp_path / "tls")
    from_file = resolve(None, {"ELASTICD_CONFIG": str(pki.config("controller"))})
    assert from_file.tls_client_auth and Path(from_file.tls_cert).is_file()
    assert from_file.cluster_token and from_file.cluster_token != pki.tokens["admin"]
    overridden = resolve(
        None,
        {"ELASTICD_CONFIG": str(pki.config("controller")), "ELASTICD_TLS_CLIENT_AUTH": "0"},
    )
    assert not overridden.tls_client_auth
    with pytest.raises(SecurityError, match="tls_key"):
        resolve(None, {"ELASTICD_TLS_CERT": from_file.tls_cert})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tls_cert": "x.pem", "colour": "blue"}))
    with pytest.raises(SecurityError, match="colour"):
        resolve(None, {"ELASTICD_CONFIG": str(bad)})
    with pytest.raises(SecurityError) as info:
        parse_tokens(
            yaml.safe_dump(
                {"tokens": [{"name": "a", "role": "boss", "token": "t"}, {"role": "read"}]}
            ),
            "tokens.yaml",
        )
    assert "tokens[0].role" in str(info.value) and "tokens[1].name" in str(info.value)


def test_each_kind_gets_its_own_certificate_and_users_only_their_own(tmp_path):
    pki = make_local_pki(tmp_path / "tls", users=USERS)

    def common_name(path: str) -> str:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    daemons = {kind: pki.daemon(kind) for kind in ("controller", "ps", "agent")}
    for kind, settings in daemons.items():
        assert common_name(settings.tls_cert) == f"elasticd-{kind}"
        assert settings.etcd_cert == settings.tls_cert  # its etcd user is its certificate's name
        assert settings.cluster_token
    # the tokens file is the controller's alone; the job certificate is for agents to hand on
    assert daemons["controller"].tokens_file and not daemons["controller"].job_cert
    assert not daemons["ps"].tokens_file and not daemons["agent"].tokens_file
    assert common_name(daemons["agent"].job_cert) == "elasticd-job"
    assert Path(daemons["agent"].job_key).stat().st_mode & 0o004  # grants nothing by itself
    assert not Path(daemons["agent"].tls_key).stat().st_mode & 0o077
    assert "tokens_file" not in yaml.safe_load(pki.config("ps").read_text())
    # a user's settings: their own certificate and token, etcd's read-only user; no
    # daemon's key, no cluster token, no tokens file
    daemon_files = {Path(s.tls_key) for s in daemons.values()} | {
        Path(pki.directory / "tokens.yaml")
    }
    for user in USERS:
        client = pki.client(user)
        assert common_name(client.tls_cert) == f"user:{user}"
        assert client.token == pki.tokens[user]
        assert not client.cluster_token and not client.tokens_file
        assert client.etcd_user == "elasticd-client"
        files = yaml.safe_load((pki.directory / f"client-{user}.yaml").read_text())
        named = {Path(pki.directory / v) for v in files.values() if isinstance(v, str)}
        assert not named & daemon_files
        assert "cluster-token" not in files.values()
    admin = yaml.safe_load(pki.client_config.read_text())
    assert admin["token_file"] == "token-root"
