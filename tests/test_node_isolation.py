"""What a training process gets on its node: an allow-listed environment, its own user,
its job's directory, interpreters of its own job only (issue 25, items 2 and 6).

The run-as test starts a real agent as root with ``--run-as nobody`` on a cluster
whose settings hold every secret elasticd knows (mutual TLS, a cluster token, a
tokens file), and a script job that reports what it can see and read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

from elasticd.client import JobClient
from elasticd.local_processes import start_process
from elasticd.retry import wait_until
from elasticd.security.certs import Issued
from elasticd.security.config import Security
from elasticd.security.confinement import ConfinementError, forbidden, training_environment
from elasticd.security.local_pki import make_local_pki
from elasticd.worker.agent.api import ProcessSpec
from elasticd.worker.agent.launch import RUNTIME_ARGV
from elasticd.worker.agent.main import add_arguments, make_sandbox
from elasticd.worker.agent.sandbox import Sandbox, SandboxError
from elasticd.worker.agent.supervisor import ProcessSupervisor, warm_shares
from tests.jobs import spec_yaml

# What a training process must never see, by name.
FORBIDDEN = (
    "ELASTICD_CLUSTER_TOKEN",
    "ELASTICD_TOKENS_FILE",
    "ELASTICD_CONFIG",
    "ELASTICD_TOKEN",
    "ELASTICD_JOB_SECRET",
    "ELASTICD_ETCD_PASSWORD",
    "ELASTICD_ETCD_USER",
    "ELASTICD_ETCD_KEY",
)

# -- the environment, as a pure function -------------------------------------------


def agent_environment() -> dict[str, str]:
    """An agent's environment after export_to_environment, and a few of the operator's."""
    return {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "NCCL_DEBUG": "INFO",
        "HOME": "/root",
        "AWS_SECRET_ACCESS_KEY": "agent-secret",
        "ELASTICD_CLUSTER_TOKEN": "cluster-secret",
        "ELASTICD_TOKENS_FILE": "/etc/elasticd/tokens.yaml",
        "ELASTICD_CONFIG": "/etc/elasticd/cluster.yaml",
        "ELASTICD_ETCD_PASSWORD": "etcd-secret",
        "ELASTICD_TLS_KEY": "/etc/elasticd/node-key.pem",
        "ELASTICD_TLS_CERT": "/etc/elasticd/node.pem",
        "ELASTICD_JOB_SECRET": "job-secret",
        "ELASTICD_LOG_FORMAT": "json",
    }


def test_a_training_environment_is_an_allow_list_plus_the_job_certificate():
    security = Security(
        tls_ca="/etc/elasticd/ca.pem",
        tls_server_name="elasticd",
        tls_client_auth=True,
        cluster_token="cluster-secret",
        job_cert="/etc/elasticd/job.pem",
        job_key="/etc/elasticd/job-key.pem",
    )
    env = training_environment(agent_environment(), security, extra=["AWS_SECRET_ACCESS_KEY"])
    # Passed as they are: the allow list, and AWS_SECRET_ACCESS_KEY the operator named.
    kept = ("PATH", "LANG", "LC_ALL", "OMP_NUM_THREADS", "NCCL_DEBUG", "HOME")
    kept += ("AWS_SECRET_ACCESS_KEY", "ELASTICD_LOG_FORMAT")
    assert env == {
        **{name: agent_environment()[name] for name in kept},
        "ELASTICD_TLS_CA": "/etc/elasticd/ca.pem",
        "ELASTICD_TLS_SERVER_NAME": "elasticd",
        # the job's handshake certificate, never the node's
        "ELASTICD_TLS_CERT": "/etc/elasticd/job.pem",
        "ELASTICD_TLS_KEY": "/etc/elasticd/job-key.pem",
    }
    # Without mutual TLS there is no certificate to present; without --worker-env no AWS.
    plain = training_environment(agent_environment(), Security(tls_ca="/ca.pem"))
    assert "ELASTICD_TLS_KEY" not in plain and "ELASTICD_TLS_CERT" not in plain
    assert "AWS_SECRET_ACCESS_KEY" not in plain


def test_the_operator_cannot_allow_a_secret_by_name():
    for name in (*FORBIDDEN, "ELASTICD_TLS_KEY", "ELASTICD_ETCD_CA"):
        assert forbidden(name), name
        with pytest.raises(ConfinementError, match=name):
            training_environment(agent_environment(), Security(), extra=[name])


def test_warm_interpreters_are_shared_out_by_job_most_recent_first():
    assert warm_shares(["b", "a"], {"a": 1, "b": 2}, 2) == {"b": 2, "a": 0}
    assert warm_shares(["b", "a"], {"a": 1, "b": 1}, 2) == {"b": 1, "a": 1}
    assert warm_shares(["a"], {}, 1) == {"a": 1}  # between a process's exit and its restart


# -- warm interpreters belong to one job -------------------------------------------


def marker_module(directory: Path, name: str) -> Path:
    """A task file that records, in ``<directory>/<name>.imported``, each pid importing it."""
    path = directory / f"{name}.py"
    record = directory / f"{name}.imported"
    path.write_text(f"import os\nopen({str(record)!r}, 'a').write(f'{{os.getpid()}}\\n')\n")
    return path


def importers(directory: Path, name: str) -> set[int]:
    path = directory / f"{name}.imported"
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


@pytest.mark.slow
def test_a_warm_interpreter_of_one_job_is_never_taken_by_another(tmp_path):
    exits: queue.Queue = queue.Queue()
    sup = ProcessSupervisor(exits.put, warm=2, warm_argv=RUNTIME_ARGV, warm_log_dir=str(tmp_path))
    assignment = {
        "job_id": "a",
        "worker_id": "n.0",
        "generation": 1,
        "world_size": 1,
        "members": [{"worker_id": "n.0", "node_id": "n", "rank": 0, "local_rank": 0}],
        "spec": {"mode": "no-such-mode"},
        "controller": "127.0.0.1:1",
    }

    def launch(job: str, worker: str) -> int:
        spec = ProcessSpec(job, worker, RUNTIME_ARGV, {}, str(tmp_path / job / f"{worker}.log"))
        return sup.start(spec, {"assignment": {**assignment, "job_id": job, "worker_id": worker}})

    try:
        task_a, task_b = marker_module(tmp_path, "task_a"), marker_module(tmp_path, "task_b")
        launch("a", "n.0")  # cold: starts job a's pool
        assert exits.get(timeout=60).key == ("a", "n.0")
        sup.preload("a", str(task_a))
        warm_a = wait_until(lambda: sup.warm_pids("a"), 60, "a warm interpreter of job a")
        wait_until(lambda: set(warm_a) <= importers(tmp_path, "task_a"), 60, "a's preload")
        # It started in job a's directory.
        assert os.readlink(f"/proc/{warm_a[0]}/cwd") == str(tmp_path / "jobs" / "a")

        # Job b arrives: its first process is a new interpreter, not a's warm one.
        sup.preload("b", str(task_b))
        pid_b = launch("b", "n.0")
        assert pid_b not in warm_a
        assert exits.get(timeout=60).key == ("b", "n.0")
        warm_b = wait_until(lambda: sup.warm_pids("b"), 60, "a warm interpreter of job b")
        wait_until(lambda: set(warm_b) <= importers(tmp_path, "task_b"), 60, "b's preload")
        # Neither job's module was imported by the other's interpreters.
        assert not importers(tmp_path, "task_a") & ({pid_b} | set(warm_b))
        assert not importers(tmp_path, "task_b") & set(warm_a)

        # A restart within job a still takes a's warm interpreter (same pid).
        alive_a = sup.warm_pids("a")
        assert launch("a", "n.1") in alive_a
        assert exits.get(timeout=60).key == ("a", "n.1")

        # Job a leaves the node: its warm interpreters go, b's stay.
        sup.keep_jobs({"b"})
        wait_until(lambda: not sup.warm_pids("a"), 30, "job a's warm interpreters to stop")
        assert sup.warm_pids("b")
    finally:
        sup.stop_all(grace=2)


# -- an agent run as root with --run-as --------------------------------------------

REPORT_SCRIPT = """
import json, os, sys, time
paths = json.loads(sys.argv[1])

def read(path, content=False):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data.decode(errors="replace") if content else "read"
    except OSError as exc:
        return type(exc).__name__

cwd = os.stat(".")
report = {
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "cwd": os.getcwd(), "cwd_owner": cwd.st_uid, "cwd_mode": cwd.st_mode & 0o7777,
    "env": dict(os.environ),
    "proc_environ": read("/proc/self/environ", content=True),
    "sys_path": sys.path[:3],
    "reads": {name: read(path) for name, path in paths.items()},
    "agent_environ": read(f"/proc/{os.getppid()}/environ"),
}
print("REPORT " + json.dumps(report), flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
"""


@pytest.mark.slow
def test_an_agent_run_as_root_with_run_as_confines_its_training_processes(
    cluster, unprivileged, unprivileged_python, open_dir, tmp_path
):
    pki = make_local_pki(open_dir / "tls", mutual=True, etcd=False)
    agent_settings = pki.daemon("agent")
    job = Issued(Path(agent_settings.job_cert), Path(agent_settings.job_key))
    assert stat.S_IMODE(job.key.stat().st_mode) == 0o644  # it grants nothing: readable
    secrets = {
        "tokens_file": pki.directory / "tokens.yaml",
        "cluster_token": pki.directory / "cluster-token",
        "node_key": Path(agent_settings.tls_key),
        "admin_token": pki.directory / "token-admin",
    }
    for path in secrets.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path  # as written for root
    c = cluster(ps=0, agents=0, pki=pki)
    work = open_dir / "work"
    logs = tmp_path / "agent-logs"
    agent = start_process(
        "node-0",
        [unprivileged_python, "-m", "elasticd", "agent", "--etcd", c.etcd,
         "--prefix", c.prefix, "--lease-ttl", "3", "--node-id", "node-0",
         "--host", "127.0.0.1", "--log-dir", str(logs), "--work-dir", str(work),
         "--run-as", unprivileged.name, "--warm", "1"],
        tmp_path / "node-0.log",
        env={"ELASTICD_CONFIG": str(pki.config("agent")),
             "AWS_SECRET_ACCESS_KEY": "agent-secret"},
    )  # fmt: skip
    c.procs["node-0"] = agent  # stopped with the cluster
    c.wait_registered(ps=[], nodes=["node-0"])

    script = open_dir / "report.py"
    script.write_text(REPORT_SCRIPT)
    script.chmod(0o644)
    go = open_dir / "go"
    paths = {**{k: str(v) for k, v in secrets.items()}, "job_key": str(job.key)}
    client = JobClient(etcd=c.etcd, prefix=c.prefix, security=c.client_security("admin"))
    job_id = client.submit_yaml(
        spec_yaml(
            mode="script",
            script={"path": str(script), "args": [json.dumps(paths), str(go)]},
            workers={"min": 1, "max": 1},
        )
    )
    log_path = logs / job_id / "node-0.0.log"

    def report() -> dict | None:
        text = log_path.read_text() if log_path.exists() else ""
        found = re.search(r"^REPORT (.*)$", text, re.M)
        return json.loads(found.group(1)) if found else None

    seen = wait_until(report, 120, f"the script's report in {log_path}")
    # It runs as nobody, in its own group only, in its job's directory (0700, nobody's).
    assert (seen["uid"], seen["euid"], seen["gid"]) == (
        unprivileged.uid,
        unprivileged.uid,
        unprivileged.gid,
    )
    assert set(seen["groups"]) <= {unprivileged.gid}
    assert seen["cwd"] == str(work / job_id)
    assert (seen["cwd_owner"], seen["cwd_mode"]) == (unprivileged.uid, 0o700)
    # sys.path[0] is the script's directory, as `python PATH` gives it; never the cwd.
    assert seen["sys_path"][0] == str(open_dir) and seen["cwd"] not in seen["sys_path"]
    # Nothing secret in its environment, read either way: from os.environ, and from
    # /proc/<pid>/environ as root (the process itself may not: it is non-dumpable).
    (proc,) = [
        p
        for p in psutil.Process(agent.popen.pid).children()
        if p.environ().get("ELASTICD_JOB_ID") == job_id
    ]
    assert proc.uids().real == unprivileged.uid
    assert seen["proc_environ"] == "PermissionError"
    cluster_token = (pki.directory / "cluster-token").read_text().strip()
    for env in (seen["env"], proc.environ()):
        assert not [k for k in env if k in FORBIDDEN or k.startswith("ELASTICD_ETCD_")], env
        assert "AWS_SECRET_ACCESS_KEY" not in env
        assert cluster_token not in json.dumps(env)
        assert env["ELASTICD_TLS_KEY"] == str(job.key)  # the job's key, not the node's
        assert env["ELASTICD_TLS_CA"] == agent_settings.tls_ca
        assert env["HOME"] == unprivileged.home
    # It cannot read the agent's secrets nor the agent's environment; it can read its own key.
    assert seen["reads"] == {
        "tokens_file": "PermissionError",
        "cluster_token": "PermissionError",
        "node_key": "PermissionError",
        "admin_token": "PermissionError",
        "job_key": "read",
    }
    assert seen["agent_environ"] == "PermissionError"

    # Another process of the same user cannot read its environment (it is non-dumpable),
    # though it could read a process of that user that is not.

    def read_as_nobody(pid: int) -> subprocess.CompletedProcess:
        code = f"open('/proc/{pid}/environ', 'rb').read()"
        argv = ["runuser", "-u", unprivileged.name, "--", unprivileged_python, "-c", code]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    refused = read_as_nobody(proc.pid)
    assert refused.returncode != 0 and "PermissionError" in refused.stderr, refused
    plain = subprocess.Popen(["runuser", "-u", unprivileged.name, "--", "sleep", "60"])
    try:
        sleeper = wait_until(
            lambda: [p for p in psutil.Process(plain.pid).children() if p.name() == "sleep"],
            10,
            "the sleep",
        )[0]
        assert read_as_nobody(sleeper.pid).returncode == 0  # the control: same user, dumpable
    finally:
        plain.kill()
        plain.wait()

    # The job's warm interpreter runs as nobody too, with the same environment.
    warm = wait_until(
        lambda: [
            p
            for p in psutil.Process(agent.popen.pid).children()
            if p.pid != proc.pid
            and "elasticd.worker.runtime" in " ".join(p.cmdline())
            and "-S" not in p.cmdline()[:2]  # the spawn shim, before it execs the runtime
        ],
        60,
        "the job's warm interpreter",
    )
    for p in warm:
        assert p.uids().real == unprivileged.uid
        assert p.cwd() == str(work / job_id)
        env = p.environ()
        assert not [k for k in env if k in FORBIDDEN or k.startswith("ELASTICD_ETCD_")], env
        assert "AWS_SECRET_ACCESS_KEY" not in env

    go.touch()
    status = client.wait(job_id, timeout=120, interval=0.5)
    assert status.state == "COMPLETED", status
    client.close()


# -- the agent's side: job directories, flags ----------------------------------------


def test_a_job_directory_is_made_0700_for_the_run_as_user_and_never_through_a_link(
    unprivileged, open_dir
):
    sandbox = Sandbox({}, open_dir / "work", unprivileged)
    sandbox.check_reachable()
    path = Path(sandbox.job_dir("j1"))
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        unprivileged.uid,
        unprivileged.gid,
        0o700,
    )
    assert stat.S_IMODE((open_dir / "work").stat().st_mode) == 0o711  # no job lists another
    (open_dir / "work" / "j2").symlink_to("/etc")
    for bad in ("j2", "..", "a/b", ""):
        with pytest.raises(SandboxError):
            sandbox.job_dir(bad)
    hidden = open_dir / "hidden"
    hidden.mkdir(mode=0o700)
    with pytest.raises(SandboxError, match="cannot enter"):
        Sandbox({}, hidden / "work", unprivileged).check_reachable()


def test_a_root_agent_without_run_as_warns_and_a_secret_cannot_be_passed(tmp_path, caplog):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--log-dir", str(tmp_path / "logs")])
    with caplog.at_level(logging.WARNING):
        sandbox = make_sandbox(args, Security())
    assert sandbox.work_dir == tmp_path / "logs" / ".work"
    assert sandbox.run_as is None
    if os.geteuid() == 0:
        assert "event=training_as_root" in caplog.text
    args = parser.parse_args(["--worker-env", "ELASTICD_CLUSTER_TOKEN"])
    with pytest.raises(ConfinementError, match="ELASTICD_CLUSTER_TOKEN"):
        make_sandbox(args, Security())
    with pytest.raises(ConfinementError, match="no such user"):
        make_sandbox(parser.parse_args(["--run-as", "no-such-user-here"]), Security())
