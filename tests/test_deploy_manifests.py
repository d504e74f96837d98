"""deploy/k8s and deploy/grafana cannot drift from the code they deploy.

* every manifest is valid against the Kubernetes API schemas (offline, from the
  schemas kubernetes-validate ships), strictly: an unknown field is an error;
* the kustomization names exactly the manifests of its directory;
* every elasticd container's arguments parse with the real CLI parser, and
  every ``$(VAR)`` in them is a variable the container defines;
* the daemons, started with the manifests' own arguments (loopback addresses,
  free ports and a test etcd put in place), answer the probes' gRPC health
  checks on the probes' ports, and their /metrics export every metric the
  Grafana dashboard queries;
* least privilege (issue 25): every pod runs as a non-root user without privilege
  escalation and without a service-account token; each daemon kind mounts only its
  own kind's Secret (the tokens file only the controller's) and reads its own
  settings file; etcd speaks TLS to clients and peers and requires client
  certificates; the etcd roles script, run against a real etcd, sets up exactly the
  roles of :func:`elasticd.coord.access.etcd_roles`. The systemd recipe likewise.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasticd.cli import build_parser
from elasticd.coord.access import etcd_roles
from elasticd.coord.etcd import EtcdClient, EtcdRefused
from elasticd.coord.keys import Keys
from elasticd.local_etcd import EtcdServer
from elasticd.local_processes import Proc, etcd_binary, free_port, start_process, stop_process
from elasticd.logs import FORMAT_ENV
from elasticd.retry import wait_until
from elasticd.security import Security
from elasticd.security.config import CONFIG_ENV, ENV
from elasticd.security.local_pki import make_local_pki

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


def workloads() -> list[tuple[str, dict]]:
    """(where, pod spec) of every workload: Deployments, StatefulSets, DaemonSets, Jobs."""
    out = []
    for path in manifests():
        for doc in documents(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec")
            if pod is not None:
                out.append((f"{path.name}: {doc['kind']} {doc['metadata']['name']}", pod))
    return out


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
                    port = (c[kind].get("grpc") or c[kind]["tcpSocket"])["port"]
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


# -- least privilege ---------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"
ROLES_SCRIPT = K8S / "etcd-roles.sh"
# The Secret each workload mounts, and nothing else of the cluster's.
SECRETS = {
    "elasticd-controller": "elasticd-controller",
    "elasticd-ps": "elasticd-ps",
    "elasticd-agent": "elasticd-agent",
    "elasticd-etcd": "elasticd-etcd",
    "elasticd-etcd-roles": "elasticd-etcd-admin",
}
STORAGE_SECRET = "elasticd-storage"  # object storage credentials, as env (deploy/README.md)


def workload_name(where: str) -> str:
    return where.rsplit(" ", 1)[1]


def test_every_pod_runs_as_a_non_root_user_without_privilege_escalation() -> None:
    found = set()
    for where, pod in workloads():
        found.add(workload_name(where))
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert context.get("runAsUser", 0) > 0, f"{where}: runAsUser, not root"
        for c in pod["containers"] + pod.get("initContainers", []):
            own = c.get("securityContext", {})
            assert own.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
            assert own.get("runAsUser", context["runAsUser"]) > 0, f"{where} {c['name']}"
            assert not own.get("privileged"), f"{where} {c['name']}"
            assert "ALL" in own.get("capabilities", {}).get("drop", []), f"{where} {c['name']}"
    assert found == set(SECRETS), found  # etcd and its roles Job included


def test_no_pod_gets_a_service_account_token() -> None:
    """The agents' pods run training processes (user code); no pod calls the API."""
    for where, pod in workloads():
        assert pod.get("automountServiceAccountToken") is False, where


def secret_volumes(pod: dict) -> dict[str, dict]:
    return {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}


def test_each_kind_mounts_only_its_own_secret_and_reads_its_own_settings() -> None:
    holders: dict[str, set[str]] = {}  # file of a Secret -> workloads that get it
    for where, pod in workloads():
        name = workload_name(where)
        secrets = secret_volumes(pod)
        assert {s["secretName"] for s in secrets.values()} == {SECRETS[name]}, where
        for c in pod["containers"]:
            refs = {r["secretRef"]["name"] for r in c.get("envFrom", []) if "secretRef" in r}
            assert refs <= {STORAGE_SECRET}, f"{where}: secrets as environment: {refs}"
        for secret in secrets.values():
            assert "items" in secret, f"{where}: name the files it gets (items)"
            for item in secret["items"]:
                holders.setdefault(item["path"], set()).add(name)
                mode = item.get("mode", secret.get("defaultMode", 0o644))
                if item["path"] != "job-key.pem":  # grants nothing without a job credential
                    assert not mode & 0o007, f"{where}: {item['path']} readable by others"
    for kind in ("controller", "ps", "agent"):
        assert holders[f"{kind}-key.pem"] == {f"elasticd-{kind}"}
        assert holders[f"{kind}.yaml"] == {f"elasticd-{kind}"}
    assert holders["tokens.yaml"] == {"elasticd-controller"}
    assert holders["job-key.pem"] == {"elasticd-agent"}
    assert holders["cluster-token"] == {"elasticd-controller", "elasticd-ps", "elasticd-agent"}
    assert holders["etcd-key.pem"] == {"elasticd-etcd"}
    assert holders["root-key.pem"] == {"elasticd-etcd-roles"}
    for where, c in elasticd_containers():
        kind = c["args"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        config = Path(env[CONFIG_ENV])
        assert config.name == f"{kind}.yaml", where
        mounts = {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "identity"}
        assert str(config.parent) in mounts, f"{where}: {config} is not in its Secret"
        assert "--insecure" not in c["args"], f"{where}: plaintext and unauthenticated"


def etcd_arguments() -> list[str]:
    (etcd,) = [c for _, _, c in containers() if c["name"] == "etcd"]
    return etcd["args"]


def test_etcd_speaks_tls_to_clients_and_peers_and_requires_client_certificates() -> None:
    args = etcd_arguments()
    flags = {a.partition("=")[0]: a.partition("=")[2] for a in args}
    for flag in ("--cert-file", "--key-file", "--trusted-ca-file", "--peer-cert-file",
                 "--peer-key-file", "--peer-trusted-ca-file"):  # fmt: skip
        assert flags.get(flag), f"etcd: {flag}"
    assert "--client-cert-auth" in args and "--peer-client-cert-auth" in args
    for flag in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
                 "--initial-advertise-peer-urls", "--initial-cluster"):  # fmt: skip
        urls = re.findall(r"\w+://", flags[flag])
        assert urls and set(urls) == {"https://"}, f"etcd {flag}: {flags[flag]}"


def test_the_systemd_units_run_each_kind_with_its_own_settings_and_etcd_with_tls() -> None:
    env = (SYSTEMD / "elasticd.env").read_text()
    assert not re.search(rf"^{CONFIG_ENV}=", env, re.M), "one settings file for all kinds"
    for kind, unit in (("controller", "elasticd-controller.service"), ("ps", "elasticd-ps@.service"),
                       ("agent", "elasticd-agent.service")):  # fmt: skip
        text = (SYSTEMD / unit).read_text()
        assert f"Environment={CONFIG_ENV}=/etc/elasticd/{kind}.yaml\n" in text, unit
        assert "NoNewPrivileges=yes" in text, unit
        if kind != "agent":
            assert re.search(r"^User=(?!root)\w+", text, re.M), unit
    # The agent starts as root only to run training processes as another user, and keeps
    # only the capabilities that takes: user code never runs as the agent's user.
    agent = (SYSTEMD / "elasticd-agent.service").read_text()
    assert re.search(r"^ExecStart=.* agent .*--run-as (?!root)\S+", agent, re.M)
    bounded = re.search(r"^CapabilityBoundingSet=(.+)$", agent, re.M)
    assert bounded and set(bounded.group(1).split()) <= {
        "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_KILL", "CAP_DAC_OVERRIDE"
    }  # fmt: skip
    etcd = (SYSTEMD / "etcd.service").read_text()
    assert "--client-cert-auth" in etcd and "--peer-client-cert-auth" in etcd
    assert "http://" not in etcd and re.search(r"^User=(?!root)\w+", etcd, re.M)
    assert (SYSTEMD / "etcd-roles.sh").resolve() == ROLES_SCRIPT.resolve()


def test_the_etcd_roles_script_sets_up_exactly_the_planned_roles(tmp_path) -> None:
    """Run as an operator would (etcdctl, a root certificate), twice: the second run,
    with authentication on, changes nothing."""
    pki = make_local_pki(tmp_path / "tls", etcd_auth=False)
    root = pki.authority.issue(pki.directory, "root", stem="root")
    ca = str(pki.authority.cert)
    server = EtcdServer.on_tls(tmp_path / "etcd", pki).start()
    password = tmp_path / "client-password"
    password.write_text("reader-secret\n")
    prefix = "/deployed"
    env = {
        "PATH": f"{Path(etcd_binary()).parent}:/usr/bin:/bin",
        "ETCDCTL_ENDPOINTS": server.client_url,
        "ETCDCTL_CACERT": ca,
        "ETCDCTL_CERT": str(root.cert),
        "ETCDCTL_KEY": str(root.key),
        "ETCD_CLIENT_PASSWORD_FILE": str(password),
        "ELASTICD_PREFIX": prefix,
    }
    try:
        for _ in range(2):
            done = subprocess.run(
                ["sh", str(ROLES_SCRIPT)], env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
        for kind, role in etcd_roles(Keys(prefix)).items():
            got = subprocess.run(
                ["etcdctl", "role", "get", role.user, "-w", "json"],
                env=env, capture_output=True, text=True, timeout=30, check=True,
            ).stdout  # fmt: skip
            perms = json.loads(got).get("perm", [])
            granted = {(base64.b64decode(p["key"]).decode(), p.get("permType", 0)) for p in perms}
            planned = {(g.prefix, 2 if g.write else 0) for g in role.grants}  # READWRITE = 2
            assert granted == planned, kind
        reader = Security(
            etcd_ca=ca,
            etcd_cert=str(pki.certificates["user-admin"].cert),
            etcd_key=str(pki.certificates["user-admin"].key),
            etcd_user="elasticd-client",
            etcd_password="reader-secret",
        )
        client = EtcdClient(server.endpoint, security=reader)
        try:
            client.get_prefix(Keys(prefix).election)
            with pytest.raises(EtcdRefused):
                client.put(Keys(prefix).assignment("n1", "j"), b"x")
        finally:
            client.close()
    finally:
        server.stop()
