"""What command and environment a training process gets, by mode.

ps-async and allreduce processes run elasticd's own runtime, which reads its
assignment from the control pipe. A ``script`` process runs the user's
unmodified torchrun-style script with torchrun's environment contract, so a
script written for torchrun runs here as it is. It runs in the same runtime
interpreter (``--script PATH ARGS``), which runs it as ``python PATH ARGS``
would: so a warm interpreter, torch and the script's top-level imports
already imported, can become a script process as well.

The interpreter starts with ``-P``: its working directory (the job's, which
the job's code may write) is not put on ``sys.path`` ahead of elasticd and
torch. A script still finds its own directory first, as ``python PATH``
would give it (``run_script``).
"""

from __future__ import annotations

import ast
import functools
import os
import sys

from elasticd.addresses import interface_of
from elasticd.worker.agent.api import ProcessSpec

# The command of every ps-async and allreduce process: the agent keeps some
# started in advance (warm), with torch imported, waiting for an assignment.
# ``-P`` (Python 3.11): no unsafe sys.path[0]. Before 3.11 a ``-c`` that drops it does the same.
SAFE_PATH = ("-P", "-m", "elasticd.worker.runtime")
_SAFE_PATH_310 = (
    "-c",
    "import runpy, sys; del sys.path[0]; "
    "runpy.run_module('elasticd.worker.runtime', run_name='__main__', alter_sys=True)",
)
RUNTIME_ARGV = (sys.executable, *(SAFE_PATH if sys.version_info >= (3, 11) else _SAFE_PATH_310))
# The interface each torch.distributed backend binds its sockets to: gloo (CPU) and
# NCCL (its bootstrap and its socket transport between GPU hosts).
INTERFACE_ENVS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def torchrun_env(assignment: dict, worker_id: str, restarts: int) -> dict[str, str]:
    """torchrun's variables for one process of a generation."""
    members = assignment["all_members"]
    me = next(m for m in members if m["worker_id"] == worker_id)
    nodes = sorted({m["node_id"] for m in members})
    local = [m for m in members if m["node_id"] == me["node_id"]]
    world = str(len(members))
    return {
        "RANK": str(me["rank"]),
        "LOCAL_RANK": str(me["local_rank"]),
        "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": str(len(local)),
        "GROUP_RANK": str(nodes.index(me["node_id"])),
        "GROUP_WORLD_SIZE": str(len(nodes)),
        "ROLE_NAME": "default",
        "ROLE_RANK": str(me["rank"]),
        "ROLE_WORLD_SIZE": world,
        "MASTER_ADDR": assignment["master_addr"],
        "MASTER_PORT": str(assignment["master_port"]),
        "TORCHELASTIC_RESTART_COUNT": str(restarts),
        "TORCHELASTIC_MAX_RESTARTS": str(assignment["spec"]["max_restarts"]),
        "TORCHELASTIC_RUN_ID": assignment["job_id"],
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }


@functools.lru_cache(maxsize=64)
def script_imports(path: str) -> tuple[str, ...]:
    """The modules a script imports at its top level (not inside functions or ``if``).

    Read from its source, never run. A warm interpreter imports them ahead of a
    restart; one whose import fails there is left to the script.
    """
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)  # noqa: SIM115
    except (OSError, SyntaxError, ValueError):
        return ()
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return tuple(dict.fromkeys(names))


def socket_interfaces(node_address: str) -> dict[str, str]:
    """``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME``: the interface that holds
    the node's advertised address.

    Without them gloo binds to what the hostname resolves to, falling back to
    loopback where the peers on other nodes cannot reach it, and NCCL takes the
    first interface that is not loopback or docker, which on a host with several
    networks need not be the one its peers reach. Each is left alone when the
    agent's own environment sets it, and both when the address is loopback (a
    local cluster, where the defaults work).
    """
    interface = interface_of(node_address)
    if not interface:
        return {}
    return {name: interface for name in INTERFACE_ENVS if not os.environ.get(name)}


def heartbeat_path(job_dir: str, worker_id: str) -> str:
    """The file a worker touches as it trains: in its job's directory, which it may write."""
    return os.path.join(job_dir, f"{worker_id}.heartbeat")


def process_spec(
    assignment: dict,
    worker_id: str,
    restarts: int,
    log_path: str,
    node_address: str = "",
    job_dir: str = "",
) -> ProcessSpec:
    job_id = assignment["job_id"]
    env = {
        "ELASTICD_JOB_ID": job_id,
        "ELASTICD_WORKER_ID": worker_id,
        "ELASTICD_RESTART_COUNT": str(restarts),
        "ELASTICD_GENERATION": str(assignment["generation"]),
        "PYTHONUNBUFFERED": "1",
    }
    if node_address:
        # Where this node's allreduce rank 0 hosts its store (as MASTER_ADDR in script mode).
        env["ELASTICD_RENDEZVOUS_HOST"] = node_address
        env.update(socket_interfaces(node_address))
    spec = assignment["spec"]
    if spec["mode"] == "script":
        script = spec["script"]
        argv = (*RUNTIME_ARGV, "--script", script["path"], *script.get("args", []))
        env.update(torchrun_env(assignment, worker_id, restarts))
        cwd_env = {"ELASTICD_SCRIPT_DIR": os.path.dirname(script["path"])}
        env.update(cwd_env)
    else:
        argv = RUNTIME_ARGV
        if job_dir:
            env["ELASTICD_HEARTBEAT_FILE"] = heartbeat_path(job_dir, worker_id)
    return ProcessSpec(job_id=job_id, worker_id=worker_id, argv=argv, env=env, log_path=log_path)


def for_worker(assignment: dict, worker_id: str) -> dict:
    """What one process of a node's assignment gets: its worker id and its own job
    credential, never the credentials of the node's other workers."""
    mine = {k: v for k, v in assignment.items() if k != "credentials"}
    mine["worker_id"] = worker_id
    credential = assignment.get("credentials", {}).get(worker_id)
    if credential:
        mine["credential"] = credential
    return mine
