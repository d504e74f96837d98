"""The drain request: `elasticd agent --drain` asks a node's running agent to drain and
waits until it has; the agent watches for it (:class:`DrainRequests`).

The request is a key in etcd, ``<prefix>/drain/<node_id>`` (``Keys.drain_request``),
which every agent watches. A key rather than an RPC to the agent: the agent
may listen on an address only its peers reach, and whoever may run this command
holds the node's etcd settings already (the same environment file the agent
uses). The agent deletes the key when it exits, and at start (a request left
for an earlier agent of the node is not for the new one).

The command returns 0 once the node's registration is gone (the agent drained
and exited), 1 if it did not go within ``--drain-wait``, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable

from elasticd.coord.cache import PrefixCache
from elasticd.coord.etcd import EtcdClient, EtcdError
from elasticd.coord.keys import Keys
from elasticd.membership import NodeInfo
from elasticd.retry import wait_until
from elasticd.security.config import SecurityError, resolve, use

DRAIN_WAIT_S = 180.0  # how long the command waits for the agent to leave


def add_drain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drain",
        action="store_true",
        help="do not run an agent: ask the running agent of this node (--node-id, default: "
        "the one registered from this host) to drain, and wait until it has left",
    )
    p.add_argument(
        "--drain-wait",
        type=float,
        default=DRAIN_WAIT_S,
        help="with --drain: how long to wait for the agent to leave, seconds",
    )


def target_node(nodes: dict[str, NodeInfo], node_id: str | None, hostname: str) -> str:
    """The node to drain: ``node_id`` if given, else the one registered from ``hostname``.

    Raises ValueError with what to pass when that is not exactly one registered node.
    """
    if node_id:
        if node_id not in nodes:
            raise ValueError(f"--node-id: no agent is registered as {node_id!r}")
        return node_id
    here = sorted(n for n, info in nodes.items() if info.hostname == hostname)
    if len(here) != 1:
        found = ", ".join(here) or "none"
        raise ValueError(
            f"--node-id: {len(here)} agents are registered from host {hostname!r} ({found}); "
            "name the one to drain"
        )
    return here[0]


def request_drain(args: argparse.Namespace) -> int:
    try:
        use(resolve(args))
    except SecurityError as exc:
        print(f"elasticd agent --drain: {exc}", file=sys.stderr)
        return 2
    keys = Keys(args.prefix)
    client = EtcdClient(args.etcd)
    try:
        kvs, _ = client.get_prefix(keys.nodes)
        nodes = {kv.key[len(keys.nodes) :]: NodeInfo.from_json(kv.value) for kv in kvs}
        try:
            node_id = target_node(nodes, args.node_id, socket.gethostname())
        except ValueError as exc:
            print(f"elasticd agent --drain: {exc}", file=sys.stderr)
            return 2
        request = {"requested_at": time.time(), "by": socket.gethostname()}
        client.put(keys.drain_request(node_id), json.dumps(request).encode())
        print(f"asked agent {node_id} to drain", flush=True)
        try:
            wait_until(
                lambda: client.get(keys.node(node_id)) is None,
                args.drain_wait,
                f"agent {node_id} to drain and leave",
                interval=0.5,
            )
        except TimeoutError as exc:
            print(f"elasticd agent --drain: {exc}", file=sys.stderr)
            return 1
        print(f"agent {node_id} drained and left", flush=True)
        return 0
    finally:
        client.close()


class DrainRequests:
    """The agent's side: a watch on the drain requests, and this node's request removed."""

    def __init__(
        self, client: EtcdClient, keys: Keys, node_id: str, on_change: Callable[[], None]
    ) -> None:
        self.client = client
        self.key = keys.drain_request(node_id)
        self.node_id = node_id
        self._cache = PrefixCache(client, keys.drain_requests, on_change)

    def clear(self) -> None:
        """Delete this node's request: one left for an earlier agent of the node is not for
        this one."""
        self.client.delete(self.key)

    def start(self) -> None:
        self._cache.start()

    def requested(self) -> bool:
        """Whether ``elasticd agent --drain`` asked this node to drain."""
        return self.node_id in self._cache.items()

    def stop(self) -> None:
        self._cache.stop()

    def withdraw(self) -> None:
        """Delete this node's request as the agent exits; when etcd does not answer, the
        next agent of this node deletes it at start."""
        try:
            self.clear()
        except EtcdError:
            pass
