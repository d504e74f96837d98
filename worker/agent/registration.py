"""The node's registration: ``<prefix>/nodes/<node_id>`` on the agent's session lease.

It advertises what the node offers (:func:`.capacity.node_capacity`) and where
its NodeAgent gRPC service listens (``agent_address``: the controller asks it
about a worker a survivor lost, :mod:`elasticd.server.controller.suspicion`).
On the lease, it vanishes with the agent (invariant 2). A draining node puts
it again with ``draining: true``: no job chooses the node from then on.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace

from elasticd.coord.keys import Keys
from elasticd.coord.session import Session
from elasticd.membership import NodeInfo
from elasticd.worker.agent.capacity import node_capacity


def default_node_id() -> str:
    """The node id when none is given: ``<hostname>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


class NodeRegistration:
    def __init__(self, session: Session, keys: Keys, node_id: str) -> None:
        self.session = session
        self.key = keys.node(node_id)
        self.node_id = node_id
        self.info: NodeInfo | None = None  # what the node advertises, once registered

    def register(self, slots: int, address: str, agent_port: int) -> NodeInfo:
        """Advertise the node, with its NodeAgent service on ``agent_port``."""
        info = node_capacity(self.node_id, slots, address)
        self.info = replace(info, agent_address=f"{info.address}:{agent_port}")
        self.session.put(self.key, self.info.to_json())
        return self.info

    def mark_draining(self) -> None:
        """Advertise the node as draining: no job chooses it."""
        self.info = replace(self.info, draining=True)
        self.session.put(self.key, self.info.to_json())
