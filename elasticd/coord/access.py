"""Who may touch which etcd keys: one etcd user and role per daemon kind, one for clients.

etcd's role-based access grants ``read`` or ``readwrite`` on key ranges, so each
kind's writes sit under prefixes of its own (:mod:`.keys`) and its role is
read-write there, read-only on what it watches, and nothing elsewhere:

=================  ===========================================  ==============================
etcd user          read-write                                   read
=================  ===========================================  ==============================
elasticd-controller ``controller/election/``, ``jobs/``,        ``nodes/``, ``ps/``,
                   ``assign/``                                  ``workers/``
elasticd-ps        ``ps/``                                      ``controller/election/``
elasticd-agent     ``nodes/``, ``workers/``, ``drain/``         ``assign/``,
                                                                ``controller/election/``
elasticd-client    (nothing)                                    ``controller/election/``
=================  ===========================================  ==============================

A daemon's etcd user is named like its certificate
(:func:`elasticd.security.identities.daemon_cert_name`): etcd run with
``--client-cert-auth`` takes a client certificate's common name as the user,
so a daemon's certificate is its etcd credential and it needs no password. The
job certificate (``elasticd-job``) and users' certificates (``user:<name>``)
name no etcd user, so they get nothing. Clients (``elasticd submit``,
:class:`elasticd.client.JobClient`) find the controller as ``elasticd-client``,
a password user that may only read the election prefix.

This module only decides; :meth:`elasticd.local_etcd.EtcdServer.enable_auth`
and ``deploy/`` apply it with ``etcdctl``.
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticd.coord.keys import Keys
from elasticd.security.identities import daemon_cert_name

CLIENT_USER = "elasticd-client"  # read-only on the election prefix: finds the controller
ROOT_USER = "root"  # etcd needs it to turn authentication on; the operator's alone


@dataclass(frozen=True)
class Grant:
    prefix: str
    write: bool  # readwrite, else read

    @property
    def permission(self) -> str:
        return "readwrite" if self.write else "read"


@dataclass(frozen=True)
class EtcdRole:
    """One etcd user with a role of the same name."""

    user: str
    grants: tuple[Grant, ...]
    password: bool = False  # authenticates with a password, not a certificate

    def may_write(self, key: str) -> bool:
        return any(g.write and key.startswith(g.prefix) for g in self.grants)

    def may_read(self, key: str) -> bool:
        return any(key.startswith(g.prefix) for g in self.grants)


def etcd_roles(keys: Keys) -> dict[str, EtcdRole]:
    """The etcd user of each daemon kind and of clients, keyed by kind (and ``client``)."""

    def rw(*prefixes: str) -> tuple[Grant, ...]:
        return tuple(Grant(p, True) for p in prefixes)

    def r(*prefixes: str) -> tuple[Grant, ...]:
        return tuple(Grant(p, False) for p in prefixes)

    grants = {
        "controller": rw(keys.election, keys.jobs, keys.all_assignments)
        + r(keys.nodes, keys.ps_servers, keys.all_workers),
        "ps": rw(keys.ps_servers) + r(keys.election),
        "agent": rw(keys.nodes, keys.all_workers, keys.drain_requests)
        + r(keys.all_assignments, keys.election),
    }
    roles = {kind: EtcdRole(daemon_cert_name(kind), g) for kind, g in grants.items()}
    roles["client"] = EtcdRole(CLIENT_USER, r(keys.election), password=True)
    return roles


def etcdctl_steps(roles: dict[str, EtcdRole], passwords: dict[str, str]) -> list[list[str]]:
    """``etcdctl`` arguments that create ``roles`` and turn authentication on.

    ``passwords`` maps user names to passwords: ``root`` and every password user.
    Certificate users are created without one (``--no-password``)."""
    steps = [["user", "add", ROOT_USER, f"--new-user-password={passwords[ROOT_USER]}"]]
    for role in roles.values():
        if role.password:
            steps.append(["user", "add", role.user, f"--new-user-password={passwords[role.user]}"])
        else:
            steps.append(["user", "add", role.user, "--no-password"])
        steps.append(["role", "add", role.user])
        for g in role.grants:
            steps.append(["role", "grant-permission", role.user, "--prefix=true", g.permission,
                          g.prefix])  # fmt: skip
        steps.append(["user", "grant-role", role.user, role.user])
    steps.append(["auth", "enable"])
    return steps
