"""deploy/k8s and deploy/grafana cannot drift from the code they deploy.

* every manifest is valid against the Kubernetes API schemas (offline, from the
  schemas kubernetes-validate ships), strictly: an unknown field is an error;
* the kustomization names exactly the manifests of its directory;
* every elasticd container's arguments parse with the real CLI parser, and
  every ``$(VAR)`` in them is a variable the container defines;
* the daemons, started with the manifests' own arguments (loopback addresses,
  free ports and a test etcd put in place), answer the probes' gRPC health
  checks on the probes' ports, and their /metrics export every metric the
  Grafana dashboard queries.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasticd.cli import build_parser
from elasticd.local_processes import Proc, free_port, start_process, stop_process
from elasticd.logs import FORMAT_ENV
from elasticd.retry import wait_until
from elasticd.security.config import CONFIG_ENV, ENV

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "elasticd.json"
KUBERNETES_VERSION = "1.33.0"  # schemas of this release, shipped by kubernetes-validate
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR) expansion
METRIC = re.compile(r"\belasticd_[a-zA-Z0-9_:]+")
# What the pod's environment gives the daemons here, in place of the downward API's.
LOCAL_POD = {"POD_IP": "127.0.0.1", "POD_NAME": "elasticd-ps-0", "NODE_NAME": "node-a"}


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def containers() -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every container of every workload."""
    out = []
    for path in manifests():
        for doc in documents(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec")
            for c in (pod or {}).get("containers", []):
                out.append((f"{path.name}: {doc['kind']} {doc['metadata']['name']}", pod, c))
    return out


def elasticd_containers() -> list[tuple[str, dict]]:
    found = [(where, c) for where, _, c in containers() if c.get("command") == ["elasticd"]]
    assert {c["args"][0] for _, c in found} == {"controller", "ps", "agent"}
    return found


def configmap() -> dict[str, str]:
    (data,) = [d["data"] for p in manifests() for d in documents(p) if d["kind"] == "ConfigMap"]
    return data


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schemas(path: Path) -> None:
    errors = []
    for doc in documents(path):
        name = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            field = ".".join(str(p) for p in exc.absolute_path) or "(top)"
            errors.append(f"{name}: field {field}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_kustomization_names_exactly_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    named = kustomization["resources"]
    missing = [n for n in named if not (K8S / n).is_file()]
    assert not missing, f"kustomization.yaml names files that do not exist: {missing}"
    unnamed = sorted({p.name for p in manifests()} - set(named))
    assert not unnamed, f"deploy/k8s files kustomization.yaml does not name: {unnamed}"
    assert len(named) == len(set(named)), f"named twice: {named}"


def test_every_argument_parses_with_the_real_cli() -> None:
    parser = build_parser()
    values = {**configmap(), **LOCAL_POD}
    for where, c in elasticd_containers():
        defined = {e["name"] for e in c.get("env", [])}
        if any(ref.get("configMapRef") for ref in c.get("envFrom", [])):
            defined |= set(configmap())
        undefined = {v for a in c["args"] for v in VARIABLE.findall(a)} - defined
        assert not undefined, f"{where}: args use undefined variables {sorted(undefined)}"
        args = [VARIABLE.sub(lambda m: values[m[1]], a) for a in c["args"]]
        refused = io.StringIO()
        try:
            with contextlib.redirect_stderr(refused):
                parsed = parser.parse_args(args)
        except SystemExit:
            parsed = None
        assert parsed is not None, f"{where}: `elasticd {' '.join(args)}`: {refused.getvalue()}"
        assert parsed.command == c["args"][0]


def test_every_configmap_setting_is_used() -> None:
    """A key is passed as a flag by some container, or read from the environment by the code."""
    used = {v for _, c in elasticd_containers() for a in c["args"] for v in VARIABLE.findall(a)}
    read = {*ENV.values(), CONFIG_ENV, FORMAT_ENV}
    unused = sorted(set(configmap()) - used - read)
    assert not unused, f"configmap.yaml settings nothing reads: {unused}"


def dashboard_metrics() -> set[str]:
    """The metric names in every query of the dashboard (panels' and variables')."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    found.update(METRIC.findall(value))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def exported_names(exposition: str) -> set[str]:
    """The series names a Prometheus exposition offers, for families with samples or none."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def local_argv(args: list[str], values: dict[str, str], ports: dict[int, int], logs: Path):
    """The manifest's arguments for a run on this machine: its ports become free ones."""
    out = []
    for a in args:
        a = VARIABLE.sub(lambda m: values[m[1]], a)
        flag, eq, value = a.partition("=")
        if eq and flag in ("--port", "--metrics-port"):
            a = f"{flag}={ports.setdefault(int(value), free_port())}"
        elif eq and flag == "--log-dir":
            a = f"{flag}={logs}"
        out.append(a)
    return out


def running(proc: Proc) -> None:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited:\n{proc.log_path.read_text()[-3000:]}")


def serving(proc: Proc, port: int) -> bool:
    running(proc)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_daemons_run_as_deployed_answer_the_probes_and_export_the_dashboards_metrics(
    etcd, prefix, tmp_path
) -> None:
    values = {
        **configmap(),
        **LOCAL_POD,
        "ELASTICD_ETCD": etcd.endpoint,
        "ELASTICD_PREFIX": prefix,
        "ELASTICD_CHECKPOINT_URL": str(tmp_path / "checkpoints"),
    }
    env = {k: v for k, v in values.items() if k in (FORMAT_ENV, *ENV.values())}
    procs, probes, metrics = [], [], []
    try:
        for where, c in elasticd_containers():
            ports: dict[int, int] = {}  # this container's ports -> free ones here
            argv = local_argv(c["args"], values, ports, tmp_path / "logs")
            name = c["args"][0]
            proc = start_process(
                name, [sys.executable, "-m", "elasticd", *argv], tmp_path / f"{name}.log", env
            )
            procs.append(proc)
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in c:
                    port = c[kind]["grpc"]["port"]
                    assert port in ports, f"{where}: {kind} port {port} is not a port it serves"
                    probes.append((where, proc, ports[port]))
            (metrics_port,) = [
                int(a.partition("=")[2]) for a in c["args"] if a.startswith("--metrics-port=")
            ]
            metrics.append((where, proc, ports[metrics_port]))

        for where, proc, port in probes:
            wait_until(lambda p=proc, n=port: serving(p, n), 60, f"{where}: gRPC health SERVING")
        exported: set[str] = set()
        for where, proc, port in metrics:
            url = f"http://127.0.0.1:{port}/metrics"
            text = wait_until(lambda p=proc, u=url: scrape(p, u), 60, f"{where}: metrics at {url}")
            exported |= exported_names(text)
    finally:
        for p in procs:  # all at once: each takes about a second to stop
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        for p in procs:
            stop_process(p)
    queried = dashboard_metrics()
    assert queried, "the dashboard queries no elasticd metric"
    unknown = sorted(queried - exported)
    assert not unknown, f"{DASHBOARD.name} queries metrics no daemon exports: {unknown}"


def scrape(proc: Proc, url: str) -> str | None:
    running(proc)
    try:
        return urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return None
