"""Everything a local cluster needs to run closed: certificates, tokens, settings files.

``elasticd up --tls`` and the tests call :func:`make_local_pki`. Each identity
gets only what it needs (ARCHITECTURE.md, invariant 11). It writes, under one
directory:

- ``ca.pem``;
- a certificate per daemon kind, named as :mod:`elasticd.security.identities`
  says: ``controller.pem`` (``elasticd-controller``), ``ps.pem``
  (``elasticd-ps``), ``agent.pem`` (``elasticd-agent``), each ``<kind>-key.pem``
  beside it; ``etcd.pem``, etcd's server certificate;
- ``job.pem``/``job-key.pem`` (``elasticd-job``), the handshake certificate of
  training processes. Its key is world-readable: it grants nothing without a
  job credential;
- ``user-<name>.pem`` (``user:<name>``) and ``token-<name>`` for each user;
- ``cluster-token`` (daemons only) and ``tokens.yaml`` (the controller only);
- with etcd authentication, ``etcd-client-password`` (the read-only user that
  finds the controller) and ``etcd-root-password`` (in no settings file);
- one settings file per daemon kind, ``controller.yaml`` (the only one that
  names the tokens file), ``ps.yaml`` and ``agent.yaml`` (with the job
  certificate), and ``client-<user>.yaml`` per user, ``client.yaml`` being the
  first admin's. A client's file holds the user's own certificate and token
  and etcd's read-only credential: no daemon's key, no cluster token.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from elasticd.coord.access import CLIENT_USER, ROOT_USER
from elasticd.security.certs import Authority, Issued, make_authority, write_secret
from elasticd.security.config import Security, from_settings
from elasticd.security.identities import DAEMON_KINDS, JOB_CERT, daemon_cert_name, user_cert_name

LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class LocalPKI:
    directory: Path
    authority: Authority
    certificates: dict[str, Issued]  # by file stem: controller, ps, agent, job, etcd, user-<name>
    tokens: dict[str, str]  # user name → its token
    mutual: bool  # servers require client certificates
    etcd: bool  # etcd speaks TLS and requires client certificates too
    etcd_passwords: dict[str, str]  # root's and the client user's; empty: no etcd auth

    @property
    def etcd_auth(self) -> bool:
        return bool(self.etcd_passwords)

    def config(self, kind: str) -> Path:
        """The settings file of a daemon kind: ``controller.yaml``, ``ps.yaml``, ``agent.yaml``."""
        if kind not in DAEMON_KINDS:
            raise ValueError(f"daemon kind: one of {', '.join(DAEMON_KINDS)}, got {kind!r}")
        return self.directory / f"{kind}.yaml"

    def daemon(self, kind: str) -> Security:
        """What a daemon of ``kind`` runs with."""
        return from_settings(_daemon_settings(self, kind), self.directory)

    def client(self, user: str | None = "admin", certificate: bool = True) -> Security:
        """Settings of a client calling as ``user``. None: no token, and the first user's
        certificate for the handshake (a caller the gate must ask for a token)."""
        return from_settings(_client_settings(self, user, certificate), self.directory)

    @property
    def client_config(self) -> Path:
        return self.directory / "client.yaml"


def make_local_pki(
    directory: str | Path,
    users: dict[str, str] | None = None,
    mutual: bool = True,
    etcd: bool = True,
    etcd_auth: bool = True,
) -> LocalPKI:
    """A CA, a certificate per daemon kind and per user, tokens and settings files;
    ``users`` maps names to roles. ``etcd_auth`` (with ``etcd``): etcd users and roles
    per kind (:mod:`elasticd.coord.access`), set up by whoever starts etcd."""
    d = Path(directory)
    authority = make_authority(d)
    hosts = (*LOCAL_HOSTS, socket.gethostname())
    certificates = {
        kind: authority.issue(d, daemon_cert_name(kind), hosts, stem=kind) for kind in DAEMON_KINDS
    }
    certificates["etcd"] = authority.issue(d, "etcd", hosts, stem="etcd")
    job = certificates["job"] = authority.issue(d, JOB_CERT, stem="job")
    job.key.chmod(0o644)  # any training process may read it: it grants nothing by itself
    users = users or {"admin": "admin"}
    for name in users:
        certificates[f"user-{name}"] = authority.issue(d, user_cert_name(name), stem=f"user-{name}")
    write_secret(d / "cluster-token")
    tokens = {name: write_secret(d / f"token-{name}") for name in users}
    entries = [{"name": n, "role": r, "token": tokens[n]} for n, r in users.items()]
    (d / "tokens.yaml").write_text(yaml.safe_dump({"tokens": entries}))
    (d / "tokens.yaml").chmod(0o600)
    passwords = {}
    if etcd and etcd_auth:  # kept across runs: an etcd started again keeps its users
        passwords = {
            ROOT_USER: _kept_secret(d / "etcd-root-password"),
            CLIENT_USER: _kept_secret(d / "etcd-client-password"),
        }
    pki = LocalPKI(d, authority, certificates, tokens, mutual, etcd, passwords)
    # Settings files name where each secret is: only their owner reads them.
    for kind in DAEMON_KINDS:
        write_secret(pki.config(kind), yaml.safe_dump(_daemon_settings(pki, kind)))
    for name in users:
        write_secret(d / f"client-{name}.yaml", yaml.safe_dump(_client_settings(pki, name)))
    admins = [n for n, r in users.items() if r == "admin"]
    client = _client_settings(pki, admins[0] if admins else None)
    write_secret(pki.client_config, yaml.safe_dump(client))
    return pki


def _kept_secret(path: Path) -> str:
    if path.is_file() and (value := path.read_text().strip()):
        return value
    return write_secret(path)


def _daemon_settings(pki: LocalPKI, kind: str) -> dict:
    """A daemon kind's settings file, relative to ``pki.directory``: its own certificate
    (also its etcd credential: etcd's user is the certificate's name) and the cluster token;
    the tokens file for the controller, the job certificate for agents."""
    settings: dict = {
        "tls_cert": f"{kind}.pem",
        "tls_key": f"{kind}-key.pem",
        "tls_ca": "ca.pem",
        "tls_client_auth": pki.mutual,
        "cluster_token_file": "cluster-token",
    }
    if kind == "controller":
        settings["tokens_file"] = "tokens.yaml"
    if kind == "agent" and pki.mutual:
        settings.update(job_cert="job.pem", job_key="job-key.pem")
    if pki.etcd:
        settings.update(etcd_ca="ca.pem", etcd_cert=f"{kind}.pem", etcd_key=f"{kind}-key.pem")
    return settings


def _client_settings(pki: LocalPKI, user: str | None, certificate: bool = True) -> dict:
    """A client's settings file, relative to ``pki.directory``: the CA, the user's own
    certificate and token, and etcd's read-only user that finds the controller."""
    client: dict = {"tls_ca": "ca.pem"}
    if user:
        client["token_file"] = f"token-{user}"
    holder = user or next(iter(pki.tokens))
    cert = {"cert": f"user-{holder}.pem", "key": f"user-{holder}-key.pem"}
    if certificate and pki.mutual:
        client.update(tls_cert=cert["cert"], tls_key=cert["key"])
    if pki.etcd:
        client.update(etcd_ca="ca.pem", etcd_cert=cert["cert"], etcd_key=cert["key"])
    if pki.etcd_auth:
        client.update(etcd_user=CLIENT_USER, etcd_password_file="etcd-client-password")
    return client
