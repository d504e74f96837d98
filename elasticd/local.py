"""Local mode: a whole elasticd cluster on one machine, as real processes.

``elasticd up`` and the test fixtures both use :class:`LocalCluster`: an etcd
from the pip-installed binary, one or more controllers, N parameter servers
and M agents, each a separate process on loopback, started with
``python -m elasticd <role>`` exactly as on a real cluster. Every process gets
a parent-death signal, so nothing outlives the process that started it, and
:meth:`LocalCluster.stop` stops them all in order (agents first, so their
training processes go too; etcd last).

It keeps ``<base_dir>/cluster.json`` (:data:`STATE_FILE`) up to date: the etcd
endpoint, the key prefix, and each daemon's name, role and pid, so that
another process on the machine (``elasticd chaos``) can find them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from elasticd.coord.access import etcd_roles
from elasticd.coord.election import observe_leader
from elasticd.coord.etcd import EtcdClient
from elasticd.coord.keys import DEFAULT_PREFIX, Keys
from elasticd.local_etcd import EtcdServer
from elasticd.local_processes import (
    STOP_GRACE_S,
    Proc,
    free_port,
    start_process,
    stop_all,
)
from elasticd.retry import wait_until
from elasticd.security.config import CONFIG_ENV, Security
from elasticd.security.local_pki import LocalPKI

STATE_FILE = "cluster.json"  # in base_dir; read by elasticd.chaos.targets


def _role(name: str) -> str:
    for prefix, role in (("controller", "controller"), ("ps", "ps"), ("node", "agent")):
        if name.startswith(prefix):
            return role
    return name


class LocalCluster:
    """Controllers, parameter servers and agents around one etcd, all on loopback."""

    def __init__(
        self,
        base_dir: str | Path,
        etcd: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl: int = 5,
        join_window: float = 1.0,
        threads_per_worker: int | None = None,
        pki: LocalPKI | None = None,
        metrics: bool = False,
        agent_args: tuple[str, ...] = (),
        agent_python: str = "",
        startup_grace: float | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.metrics = metrics  # every daemon serves /metrics on a free port (metrics_urls)
        self.pki = pki  # TLS, tokens, etcd TLS and roles, per daemon kind; None: open
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.lease_ttl = lease_ttl
        self.join_window = join_window
        self.etcd_server: EtcdServer | None = None
        self._etcd_endpoint = etcd
        self.procs: dict[str, Proc] = {}
        self.threads_per_worker = threads_per_worker
        # More flags for every agent (``--run-as nobody``), and the interpreter agents and so
        # their training processes run (one a run-as user may execute).
        self.agent_args = tuple(agent_args)
        self.agent_python = agent_python or sys.executable
        self.startup_grace = startup_grace  # controllers' --startup-grace (None: their default)
        self._client: EtcdClient | None = None

    # -- lifecycle --------------------------------------------------------------

    @property
    def etcd(self) -> str:
        if self._etcd_endpoint is None:
            raise RuntimeError("etcd not started")
        return self._etcd_endpoint

    @property
    def client(self) -> EtcdClient:
        """The harness's own etcd client: it reads what the controller reads."""
        if self._client is None:
            security = self.pki.daemon("controller") if self.pki is not None else Security()
            self._client = EtcdClient(self.etcd, security=security)
        return self._client

    def client_security(self, user: str | None = "admin") -> Security:
        """Settings of a client of this cluster calling as ``user``."""
        return self.pki.client(user) if self.pki is not None else Security()

    def start_etcd(self, port: int | None = None, fresh: bool = False) -> EtcdServer:
        """Start etcd on ``base_dir``'s data: a cluster started again keeps its jobs."""
        data = self.base_dir / "etcd"
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
        pki, client_port = self.pki, port or free_port()
        if pki is not None and pki.etcd:
            server = EtcdServer.on_tls(data, pki, client_port=client_port)
        else:
            server = EtcdServer(data, client_port=client_port)
        self.etcd_server = server.start()
        marker = self.base_dir / "etcd-auth-enabled"  # etcd keeps it in its data
        if fresh:
            marker.unlink(missing_ok=True)
        if pki is not None and pki.etcd_auth and not marker.exists():
            server.enable_auth(etcd_roles(self.keys), pki.etcd_passwords)
            marker.touch()
        self._etcd_endpoint = server.endpoint
        self.write_state()
        return server

    def _common(self) -> list[str]:
        return ["--etcd", self.etcd, "--prefix", self.prefix, "--lease-ttl", str(self.lease_ttl)]

    def _start(
        self, name: str, args: list[str], env: dict | None = None, python: str = sys.executable
    ) -> Proc:
        """Start ``elasticd <kind> ...`` (``args[0]`` is the kind) with its kind's settings."""
        if self.metrics:
            args = [*args, "--metrics-port", "0"]
        argv = [python, "-m", "elasticd", *args]
        if self.pki is not None:
            env = {**(env or {}), CONFIG_ENV: str(self.pki.config(args[0]))}
        proc = start_process(name, argv, self.base_dir / "logs" / f"{name}.log", env)
        self.procs[name] = proc
        self.write_state()
        return proc

    def start_controller(self, name: str = "controller-0") -> Proc:
        return self._start(
            name,
            ["controller", *self._common(), "--join-window", str(self.join_window),
             "--checkpoint-url", str(self.base_dir / "checkpoints"),
             *(("--startup-grace", str(self.startup_grace)) if self.startup_grace else ())],
        )  # fmt: skip

    def start_ps(self, ps_id: str, port: int = 0) -> Proc:
        """Start a PS; ``port`` reuses a fixed port (a restart, as systemd would do it)."""
        return self._start(ps_id, ["ps", *self._common(), "--id", ps_id, "--port", str(port)])

    def start_agent(self, node_id: str, slots: int = 1) -> Proc:
        env = {}
        if self.threads_per_worker:
            env = {"OMP_NUM_THREADS": str(self.threads_per_worker)}
        return self._start(
            node_id,
            ["agent", *self._common(), "--node-id", node_id, "--slots", str(slots),
             "--host", "127.0.0.1", "--log-dir", str(self.base_dir / "logs"), *self.agent_args],
            env,
            self.agent_python,
        )  # fmt: skip

    def start(
        self, ps: int = 2, agents: int = 2, controllers: int = 1, timeout: float = 60.0
    ) -> LocalCluster:
        if self._etcd_endpoint is None:
            self.start_etcd()
        for i in range(controllers):
            self.start_controller(f"controller-{i}")
        for i in range(ps):
            self.start_ps(f"ps-{i}")
        for i in range(agents):
            self.start_agent(f"node-{i}")
        self.wait_registered(
            ps=[f"ps-{i}" for i in range(ps)],
            nodes=[f"node-{i}" for i in range(agents)],
            timeout=timeout,
        )
        return self

    def state(self) -> dict:
        """Who runs where: etcd, prefix, and every daemon's name, role and pid."""
        daemons = [
            {"name": name, "role": _role(name), "pid": proc.popen.pid, "log": str(proc.log_path)}
            for name, proc in self.procs.items()
        ]
        if self.etcd_server is not None and self.etcd_server.proc is not None:
            etcd = self.etcd_server.proc
            daemons.insert(0, {"name": etcd.name, "role": "etcd", "pid": etcd.popen.pid,
                               "log": str(etcd.log_path), "address": self.etcd_server.endpoint})  # fmt: skip
        return {
            "etcd": self._etcd_endpoint or "",
            "prefix": self.prefix,
            "lease_ttl": self.lease_ttl,
            "config": str(self.pki.client_config) if self.pki is not None else "",
            "daemons": daemons,
        }

    def write_state(self) -> None:
        """Rewrite :data:`STATE_FILE` atomically (a reader never sees half of it)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.base_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        os.replace(tmp, self.base_dir / STATE_FILE)

    def registered(self, what: str) -> set[str]:
        prefix = self.keys.nodes if what == "nodes" else self.keys.ps_servers
        kvs, _ = self.client.get_prefix(prefix)
        return {kv.key[len(prefix) :] for kv in kvs}

    def leader(self) -> str | None:
        value = observe_leader(self.client, self.keys.election)
        return value.decode() if value else None

    def wait_registered(self, ps: list[str], nodes: list[str], timeout: float = 60.0) -> None:
        def check():
            for name, proc in self.procs.items():
                if not proc.alive() and proc.popen.returncode not in (0, -9, -15):
                    raise RuntimeError(
                        f"{name} exited with {proc.popen.returncode}; see {proc.log_path}"
                    )
            return (
                set(ps) <= self.registered("ps")
                and set(nodes) <= self.registered("nodes")
                and self.leader() is not None
            )

        wait_until(check, timeout, f"ps {ps}, agents {nodes} and a controller to register")

    def metrics_urls(self) -> dict[str, str]:
        """Each running daemon's /metrics URL, as its log announced it (``metrics=True``)."""
        urls = {}
        for name, proc in self.procs.items():
            text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
            found = re.findall(r"event=metrics_ready .*?url=(\S+)", text)
            if found and proc.alive():
                urls[name] = found[-1]
        return urls

    def wait_metrics(self, timeout: float = 60.0) -> dict[str, str]:
        """Every daemon's /metrics URL, once each has announced one."""
        deadline = time.monotonic() + timeout
        while len(urls := self.metrics_urls()) < len(self.procs):
            if time.monotonic() > deadline:
                missing = sorted(set(self.procs) - set(urls))
                raise TimeoutError(f"no metrics from {', '.join(missing)} after {timeout:g} s")
            time.sleep(0.1)
        return urls

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        os.killpg(proc.popen.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.popen.wait(timeout=STOP_GRACE_S)

    def addresses(self) -> dict[str, str]:
        out = {"etcd": self.etcd}
        leader = self.leader()
        if leader:
            out["controller"] = leader
        kvs, _ = self.client.get_prefix(self.keys.ps_servers)
        for kv in kvs:
            d = json.loads(kv.value)
            out[d["ps_id"]] = d["address"]
        return out

    def stop(self) -> None:
        """Stop everything: agents (and their workers), PS and controllers at once, then etcd."""
        stop_all(list(self.procs.values()))
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.etcd_server is not None:
            self.etcd_server.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
