"""What a node offers: slots, CPUs, memory, GPUs, and the address others reach it at."""

from __future__ import annotations

import os
import socket

import psutil

from elasticd.membership import NodeInfo


def gpu_count() -> int:
    """GPUs this node offers, without importing torch (an agent stays light).

    CUDA_VISIBLE_DEVICES narrows what the driver lists, as it does for CUDA.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def node_capacity(node_id: str, slots: int, address: str = "") -> NodeInfo:
    gpus = gpu_count()
    return NodeInfo(
        node_id=node_id,
        slots=slots,
        cpus=psutil.cpu_count() or 0,
        memory_bytes=psutil.virtual_memory().total,
        gpus=gpus,
        hostname=socket.gethostname(),
        address=address or socket.gethostname(),
    )
