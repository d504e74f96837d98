"""Which address a daemon tells the cluster to dial, and which interface carries it.

A daemon listening on a wildcard address (``--host 0.0.0.0``) still registers one
address in etcd for the others to dial. In order:

1. ``--advertise ADDR`` when given;
2. the hostname, when it resolves to an address this machine holds other than
   loopback: names suit TLS certificates issued for them;
3. else the local address of the route to etcd, when that is not loopback: every
   member reaches etcd, so the interface it reaches etcd through is the one the
   cluster talks on (a UDP ``connect`` picks it and sends nothing). This is what a
   container or a network namespace gets, where the hostname resolves to loopback
   or to an address of another namespace;
4. else the hostname (etcd on this machine's loopback, say).

A daemon given a specific ``--host`` advertises that host. Where the hostname
resolves here but not on the other machines (a Kubernetes pod), pass
``--advertise`` (the pod's IP).

The advertised address also decides which interface torch.distributed's gloo
binds to (:func:`interface_of`): gloo otherwise binds to whatever the hostname
resolves to, and falls back to loopback, where peers on other machines cannot
reach it.
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

WILDCARDS = ("0.0.0.0", "::", "")


def route_source(host: str, port: int = 1) -> str | None:
    """The local address this machine sends from to reach ``host``; None if no route."""
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except (OSError, ValueError):
        return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def advertised_host(host: str, advertise: str = "", etcd: str = "") -> str:
    """The address others should dial for a server listening on ``host``.

    ``etcd`` is the daemon's ``--etcd`` endpoints (``h1:2379,h2:2379``), used only
    when ``host`` is a wildcard and ``advertise`` is empty.
    """
    if advertise:
        return advertise
    if host not in WILDCARDS:
        return host
    hostname = socket.gethostname()
    if interface_of(hostname) is not None:
        return hostname
    for endpoint in filter(None, (e.strip() for e in etcd.split(","))):
        name, _, port = endpoint.removeprefix("http://").removeprefix("https://").rpartition(":")
        source = route_source(name, int(port) if port.isdigit() else 1)
        if source and not _is_loopback(source):
            return source
    return hostname


def add_advertise_argument(p) -> None:
    p.add_argument(
        "--advertise",
        default="",
        metavar="ADDR",
        help="address (or name) the others dial to reach this daemon (default: --host; "
        "with a wildcard --host, the hostname if it resolves to an address of this machine, "
        "else this machine's address on the route to etcd)",
    )


def interface_of(host: str) -> str | None:
    """The network interface that holds ``host`` (an address or a name); None when no
    interface does, or when ``host`` is a loopback address."""
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), None)}
    except (OSError, UnicodeError):
        return None
    wanted = {a for a in resolved if not _is_loopback(a)}
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] in wanted for a in addresses):
            return name
    return None
