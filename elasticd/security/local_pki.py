"""Everything a local cluster needs to run closed: certificates, tokens, settings files.

``elasticd up --tls`` and the tests call :func:`make_local_pki`. It writes,
under one directory:

- ``ca.pem``; ``node.pem``/``node-key.pem``, the certificate every daemon of
  the cluster presents (for 127.0.0.1, ::1, localhost and this host's name);
- ``cluster-token``: the members' token;
- ``tokens.yaml``: the JobService tokens (by default one admin, ``admin``),
  each secret also in ``token-<name>``;
- ``cluster.yaml`` (the daemons' settings) and ``client.yaml`` (the admin
  client's), for ``--config`` or ``ELASTICD_CONFIG``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from elasticd.security.certs import Authority, Issued, make_authority, write_secret
from elasticd.security.config import Security, from_settings, resolve
from elasticd.security.identities import NODE_CERT


@dataclass(frozen=True)
class LocalPKI:
    directory: Path
    authority: Authority
    node: Issued
    cluster: Security  # what every daemon runs with
    tokens: dict[str, str]  # identity name → its token
    etcd: bool  # etcd speaks TLS too

    def client(self, user: str | None = "admin", certificate: bool = True) -> Security:
        """Settings of a client calling as ``user`` (None: no token)."""
        return from_settings(_client_settings(self, user, certificate), self.directory)

    @property
    def client_config(self) -> Path:
        return self.directory / "client.yaml"


def make_local_pki(
    directory: str | Path,
    users: dict[str, str] | None = None,
    mutual: bool = True,
    etcd: bool = True,
    etcd_user: str = "",
    etcd_password: str = "",
) -> LocalPKI:
    """A CA, the cluster's certificate and tokens; ``users`` maps names to roles."""
    d = Path(directory)
    authority = make_authority(d)
    hosts = ("127.0.0.1", "::1", "localhost", socket.gethostname())
    node = authority.issue(d, NODE_CERT, hosts, stem="node")
    write_secret(d / "cluster-token")
    users = users or {"admin": "admin"}
    tokens = {name: write_secret(d / f"token-{name}") for name in users}
    entries = [{"name": n, "role": r, "token": tokens[n]} for n, r in users.items()]
    (d / "tokens.yaml").write_text(yaml.safe_dump({"tokens": entries}))
    (d / "tokens.yaml").chmod(0o600)
    settings = {
        "tls_cert": "node.pem",
        "tls_key": "node-key.pem",
        "tls_ca": "ca.pem",
        "tls_client_auth": mutual,
        "cluster_token_file": "cluster-token",
        "tokens_file": "tokens.yaml",
    }
    if etcd:
        settings.update(etcd_ca="ca.pem", etcd_cert="node.pem", etcd_key="node-key.pem")
    if etcd_user:
        write_secret(d / "etcd-password", etcd_password)
        settings.update(etcd_user=etcd_user, etcd_password_file=str(d / "etcd-password"))
    (d / "cluster.yaml").write_text(yaml.safe_dump(settings))
    cluster = resolve(None, {"ELASTICD_CONFIG": str(d / "cluster.yaml")})
    pki = LocalPKI(d, authority, node, cluster, tokens, etcd)
    admin = "admin" if "admin" in users else None
    (d / "client.yaml").write_text(yaml.safe_dump(_client_settings(pki, admin)))
    return pki


def _client_settings(pki: LocalPKI, user: str | None, certificate: bool = True) -> dict:
    """A client's config file, relative to ``pki.directory``: CA, its token, etcd's."""
    client = {"tls_ca": "ca.pem"}
    if user:
        client["token_file"] = f"token-{user}"
    if certificate and pki.cluster.tls_client_auth:
        client.update(tls_cert="node.pem", tls_key="node-key.pem")
    if pki.etcd:
        client.update(etcd_ca="ca.pem", etcd_cert="node.pem", etcd_key="node-key.pem")
    if pki.cluster.etcd_user:
        client.update(etcd_user=pki.cluster.etcd_user, etcd_password_file="etcd-password")
    return client
