"""A hostile tenant's training script: it looks for the cluster's secrets and tries them.

Run as a script-mode job by a user with role submit. It reads everything it can
reach (its environment, /proc, the files named in its argument, its agent's
environment), then calls what only the controller or another job's workers may
call, on another user's job, with every credential it found and with none, and
tries to write etcd. It prints one line, ``HOSTILE-REPORT <json>``, and exits 0:
the test decides what it proves.

Argument: one JSON object with ``job`` (the victim job's id), ``generation``,
``ps`` (addresses of the PS holding its groups), ``controller``, ``etcd``,
``prefix``, ``node`` and ``paths`` (files to try to read).
"""

from __future__ import annotations

import json
import os
import sys

import grpc

from elasticd.rpc import job_pb2, job_pb2_grpc, ps_pb2, ps_pb2_grpc
from elasticd.security.channels import open_channel
from elasticd.security.config import Security, current

target = json.loads(sys.argv[1])
report: dict = {"uid": os.getuid(), "env": dict(os.environ), "files": {}, "rpc": {}, "etcd": {}}


def read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16).decode(errors="replace")
    except OSError as exc:
        return f"error: {exc.strerror}"


report["proc_environ"] = read("/proc/self/environ")
for path in [*target["paths"], f"/proc/{os.getppid()}/environ"]:
    report["files"][path] = read(path)

# Every credential-looking thing it could find, and no credential at all.
found = [
    value
    for key, value in os.environ.items()
    if any(word in key for word in ("TOKEN", "SECRET", "PASSWORD", "CREDENTIAL"))
]
tokens = [None, *found]
try:
    mine = current()  # what the environment configures: TLS, perhaps a handshake certificate
except Exception as exc:  # noqa: BLE001 - settings it cannot complete
    report["settings_error"] = str(exc)
    mine = Security()


def attempt(name: str, call) -> None:
    codes = []
    for token in tokens:
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            call(metadata)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
        except Exception as exc:  # noqa: BLE001 - whatever stops it is the answer
            codes.append(f"{type(exc).__name__}: {exc}")
    report["rpc"][name] = codes


job, generation = target["job"], int(target["generation"])
fence = ps_pb2.Fence(job_id=job, generation=generation)
for address in target["ps"]:
    with open_channel(address, mine) as channel:
        ps = ps_pb2_grpc.ParameterServerStub(channel)
        attempt(
            f"ExportShard@{address}",
            lambda md, ps=ps: list(
                ps.ExportShard(ps_pb2.ExportShardRequest(fence=fence), timeout=10, metadata=md)
            ),
        )
        push = ps_pb2.PushRequest(
            header=ps_pb2.PushHeader(fence=fence, worker_id="node-0.0", base_version=0)
        )
        attempt(
            f"Push@{address}",
            lambda md, ps=ps, push=push: ps.Push(iter([push]), timeout=10, metadata=md),
        )
        attempt(
            f"DropShard@{address}",
            lambda md, ps=ps: ps.DropShard(
                ps_pb2.DropShardRequest(fence=fence), timeout=10, metadata=md
            ),
        )
with open_channel(target["controller"], mine) as channel:
    coordinator = job_pb2_grpc.TrainingCoordinatorStub(channel)
    for ahead in (1, 1000):
        attempt(
            f"PublishRendezvous+{ahead}",
            lambda md, ahead=ahead: coordinator.PublishRendezvous(
                job_pb2.RendezvousAddress(
                    job_id=job,
                    generation=generation + ahead,
                    worker_id="node-0.0",
                    address="127.0.0.1:9",
                ),
                timeout=10,
                metadata=md,
            ),
        )

# etcd: with nothing, and with whatever TLS material the environment names.
try:
    from elasticd.coord.etcd import EtcdClient

    tries = {
        "plain": Security(),
        "tls": Security(etcd_ca=mine.tls_ca),
        "tls+cert": Security(etcd_ca=mine.tls_ca, etcd_cert=mine.tls_cert, etcd_key=mine.tls_key),
    }
    for name, security in tries.items():
        key = f"{target['prefix']}/assign/{target['node']}/hostile-{name}"
        try:
            client = EtcdClient(target["etcd"], timeout=5.0, security=security)
            try:
                client.put(key, b'{"hostile": true}')
                report["etcd"][name] = "written"
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001
            report["etcd"][name] = f"{type(exc).__name__}: {exc}"[:300]
except Exception as exc:  # noqa: BLE001
    report["etcd"]["import"] = f"{type(exc).__name__}: {exc}"

print("HOSTILE-REPORT " + json.dumps(report), flush=True)
