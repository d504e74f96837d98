"""etcd least privilege: each daemon kind writes its own prefixes and is refused elsewhere.

One etcd for the module, started by :class:`LocalCluster` with a local PKI exactly as
``elasticd up --tls`` starts it: TLS, client certificates, and the users and roles of
:func:`elasticd.coord.access.etcd_roles`. Each daemon kind connects with its own
certificate (its etcd user is the certificate's name); clients with the read-only
password user.
"""

from __future__ import annotations

import pytest

from elasticd.coord.access import etcd_roles
from elasticd.coord.etcd import Compare, EtcdClient, EtcdRefused, Put
from elasticd.coord.keys import Keys
from elasticd.local import LocalCluster
from elasticd.security import Security
from elasticd.security.identities import DAEMON_KINDS
from elasticd.security.local_pki import make_local_pki

pytestmark = pytest.mark.slow

KEYS = Keys()
# A key under each prefix a daemon kind writes, by kind.
WRITES = {
    "controller": (
        KEYS.election + "candidate",
        KEYS.job_spec("j"),
        KEYS.job_status("j"),
        KEYS.generation("j"),
        KEYS.placement("j"),
        KEYS.assignment("n1", "j"),
    ),
    "ps": (KEYS.ps("ps-1"),),
    "agent": (KEYS.node("n1"), KEYS.worker("j", "n1.0"), KEYS.drain_request("n1")),
}
# A key under each prefix a kind only reads.
READS = {
    "controller": (KEYS.node("n1"), KEYS.ps("ps-1"), KEYS.worker("j", "n1.0")),
    "ps": (KEYS.election + "candidate",),
    "agent": (KEYS.assignment("n1", "j"), KEYS.election + "candidate"),
    "client": (KEYS.election + "candidate",),
}
EVERY_KEY = tuple(k for keys in WRITES.values() for k in keys) + (KEYS.prefix + "/other",)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("etcd-roles")
    pki = make_local_pki(base / "tls", users={"alice": "submit"})
    c = LocalCluster(base / "cluster", pki=pki)
    try:
        c.start_etcd()
        yield c
    finally:
        c.stop()


def connect(cluster: LocalCluster, kind: str) -> EtcdClient:
    security = cluster.client_security("alice") if kind == "client" else cluster.pki.daemon(kind)
    return EtcdClient(cluster.etcd, security=security)


@pytest.mark.parametrize("kind", DAEMON_KINDS)
def test_each_daemon_kind_writes_its_own_prefixes_and_is_refused_elsewhere(cluster, kind):
    client = connect(cluster, kind)
    try:
        lease = client.grant_lease(10)
        for key in WRITES[kind]:
            client.put(key, b"mine", lease=lease)
            assert client.get(key).value == b"mine"
        for key in READS[kind]:
            client.get(key)  # allowed, whether or not the key exists
        for key in EVERY_KEY:
            if key in WRITES[kind]:
                continue
            with pytest.raises(EtcdRefused):
                client.put(key, b"not mine")
            with pytest.raises(EtcdRefused):
                client.transaction([Compare(key, "version", "==", 0)], [Put(key, b"not mine")])
        client.revoke_lease(lease)  # etcd checks it may delete every key on the lease
        assert all(client.get(key) is None for key in WRITES[kind])
    finally:
        client.close()


def test_an_agent_cannot_write_an_assignment_nor_read_a_job(cluster):
    agent = connect(cluster, "agent")
    try:
        with pytest.raises(EtcdRefused, match="permission denied"):
            agent.put(KEYS.assignment("n1", "evil"), b'{"argv": ["sh"]}')
        with pytest.raises(EtcdRefused):
            agent.get(KEYS.job_spec("j"))
    finally:
        agent.close()


def test_a_parameter_server_cannot_write_a_job_nor_a_node(cluster):
    ps = connect(cluster, "ps")
    try:
        with pytest.raises(EtcdRefused):
            ps.put(KEYS.job_spec("j"), b"{}")
        with pytest.raises(EtcdRefused):
            ps.put(KEYS.node("n1"), b"{}")
        with pytest.raises(EtcdRefused):
            ps.get(KEYS.assignment("n1", "j"))
    finally:
        ps.close()


def test_the_clients_read_only_user_finds_the_controller_and_writes_nothing(cluster):
    controller = connect(cluster, "controller")
    client = connect(cluster, "client")
    try:
        controller.put(KEYS.election + "c0", b"127.0.0.1:5000")
        kvs, _ = client.get_prefix(KEYS.election)
        assert [kv.value for kv in kvs] == [b"127.0.0.1:5000"]
        for key in EVERY_KEY:
            with pytest.raises(EtcdRefused):
                client.put(key, b"x")
        for key in (KEYS.job_spec("j"), KEYS.node("n1"), KEYS.assignment("n1", "j")):
            with pytest.raises(EtcdRefused):
                client.get(key)
        controller.delete(KEYS.election + "c0")
    finally:
        client.close()
        controller.close()


def test_a_certificate_that_names_no_etcd_user_gets_nothing(cluster):
    """The job certificate is readable by every training process; users' certificates
    are their own: neither is an etcd user, with or without a password."""
    for stem in ("job", "user-alice"):
        cert = cluster.pki.certificates[stem]
        security = Security(
            etcd_ca=str(cluster.pki.authority.cert),
            etcd_cert=str(cert.cert),
            etcd_key=str(cert.key),
        )
        client = EtcdClient(cluster.etcd, security=security)
        try:
            with pytest.raises(EtcdRefused):
                client.get(KEYS.election + "c0")
            with pytest.raises(EtcdRefused):
                client.put(KEYS.worker("j", "n1.0"), b"x")
        finally:
            client.close()


def test_every_prefix_has_one_writer_and_every_key_a_prefix():
    """Pure: the plan covers each key elasticd writes, and no two kinds share a prefix."""
    roles = etcd_roles(KEYS)
    for kind, keys in WRITES.items():
        for key in keys:
            writers = [k for k, role in roles.items() if role.may_write(key)]
            assert writers == [kind], (key, writers)
    written = [g.prefix for role in roles.values() for g in role.grants if g.write]
    assert len(written) == len(set(written))
    assert not any(roles["client"].may_write(k) for k in EVERY_KEY)
