"""Which address a daemon advertises, and which interface gloo binds to.

The multi-host test (tests/test_multihost.py) shows the route to etcd chosen on
hosts of their own; these pin the rules that need no second machine.
"""

from __future__ import annotations

import socket

import psutil

from elasticd.addresses import advertised_host, interface_of, route_source
from elasticd.worker.agent.launch import INTERFACE_ENVS, socket_interfaces


def test_an_explicit_address_wins_and_a_specific_host_is_advertised_as_it_is():
    assert advertised_host("0.0.0.0", "gpu-07.example", "10.0.0.1:2379") == "gpu-07.example"
    assert advertised_host("10.1.2.3", "", "10.0.0.1:2379") == "10.1.2.3"
    assert advertised_host("127.0.0.1") == "127.0.0.1"


def test_a_wildcard_host_never_advertises_loopback_and_falls_back_to_the_hostname():
    # etcd on this machine's loopback says nothing about where the others reach us
    for host in ("0.0.0.0", "::", ""):
        assert advertised_host(host, "", "127.0.0.1:2379") == socket.gethostname()
    assert advertised_host("0.0.0.0", "", "") == socket.gethostname()


def test_the_route_source_is_an_address_of_this_machine():
    assert route_source("127.0.0.1", 2379) == "127.0.0.1"
    assert route_source("not an address") is None
    assert route_source("127.0.0.1:2379") is None  # a host, not an endpoint


def test_gloo_and_nccl_are_pointed_at_the_interface_holding_the_address_unless_told_otherwise(
    monkeypatch,
):
    gloo, nccl = INTERFACE_ENVS
    for name in INTERFACE_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert interface_of("127.0.0.1") is None  # loopback: the backends' defaults work
    assert socket_interfaces("127.0.0.1") == {}
    assert interface_of("no-such-host.invalid") is None
    outside = [
        (name, a.address)
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    assert outside, "this machine has no address outside loopback to check with"
    for name, address in outside:
        assert interface_of(address) == name
        assert socket_interfaces(address) == {gloo: name, nccl: name}
    monkeypatch.setenv(gloo, "eth7")  # the operator's choice stays, for each backend
    assert all(socket_interfaces(address) == {nccl: name} for name, address in outside)
    monkeypatch.setenv(nccl, "ib0")
    assert all(socket_interfaces(address) == {} for _, address in outside)
