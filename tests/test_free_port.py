"""Ports handed to processes that bind them later: free, out of the ephemeral range, and
never shared by two servers."""

from __future__ import annotations

import socket

import pytest

from elasticd import local_processes
from elasticd.local_processes import LOWEST_PORT, PORT_SLICE, free_port
from elasticd.security.config import Security
from elasticd.serving import start_grpc_server


def test_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    low = local_processes._ephemeral_low()
    held: dict[int, socket.socket] = {}
    try:
        while len(held) < PORT_SLICE - 10:  # nearly the whole slice, each port bound
            port = free_port()
            assert LOWEST_PORT <= port < low and port not in held
            held[port] = socket.socket()
            held[port].bind(("127.0.0.1", port))  # free_port never names a port in use
        for _ in range(20):  # round the slice again: the bound ports are passed over
            assert free_port() not in held
    finally:
        for s in held.values():
            s.close()


def test_each_xdist_worker_takes_its_own_slice(monkeypatch) -> None:
    starts = set()
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        port = free_port()
        start = local_processes._slice_start()
        assert start <= port < start + PORT_SLICE
        starts.add(start)
    assert len(starts) == 4


def test_a_server_refuses_a_port_another_server_listens_on() -> None:
    first, port = start_grpc_server(lambda s: None, "127.0.0.1", 0, [], Security())
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_grpc_server(lambda s: None, "127.0.0.1", port, [], Security())
    finally:
        first.stop(grace=None)
