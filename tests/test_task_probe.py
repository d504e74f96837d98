"""User code never runs in the controller: the task probe (ARCHITECTURE invariant 10).

The probe is a real subprocess (``python -m elasticd.shape_probe``); one is
shared by the module's probe tests, so torch is imported once for all of
them. The controller tests run an in-process Controller on the real etcd,
with in-process gRPC servers (JobService, parameter servers) on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from elasticd.coord.keys import Keys
from elasticd.jobspec import load_spec_yaml
from elasticd.placement import TensorSpec, tensors_from_json
from elasticd.retry import wait_until
from elasticd.rpc import job_pb2, job_pb2_grpc
from elasticd.server.controller import admission
from elasticd.server.controller.service import JobServiceServicer
from elasticd.serving import start_grpc_server
from elasticd.shape_probe.client import ProbeUnavailable, ShapeProbe
from elasticd.shape_probe.outcome import BadProbeOutput, parse_shapes
from elasticd.task import TaskError
from tests.fixtures.controller import start_controller
from tests.jobs import spec_yaml

TIMEOUT_S = 5.0  # the probe's timeout in these tests: the hanging task costs this much
MEMORY_MIB = 1536

# A small task the probe can build; {mark} is replaced by code run at import.
TASK = """\
import torch

{mark}

class Task:
    def __init__(self, batch_size, seed):
        self.batch_size, self.seed = batch_size, seed

    def build_model(self):
        {build}
        torch.manual_seed(self.seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1, bias=False))

    def batch(self, index):
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        x = torch.randn(self.batch_size, 4, generator=g)
        return x, x.sum(dim=1, keepdim=True)

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)


def make_task(batch_size, seed):
    return Task(batch_size, seed)
"""
SHAPES = [
    TensorSpec("0.weight", "float32", (3, 4)),
    TensorSpec("0.bias", "float32", (3,)),
    TensorSpec("1.weight", "float32", (1, 3)),
]


def write_task(path: Path, mark: str = "", build: str = "pass") -> str:
    path.write_text(TASK.format(mark=mark, build=build))
    return str(path)


@pytest.fixture(scope="module")
def probe() -> Iterator[ShapeProbe]:
    p = ShapeProbe(timeout_s=TIMEOUT_S, memory_mib=MEMORY_MIB)
    try:
        yield p
    finally:
        p.close()


# -- what comes back is untrusted ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"parameters": {}}', "list of parameters"),
        ('{"parameters": [], "extra": 1}', "list of parameters"),
        ('{"parameters": [{"name": "w", "dtype": "float32"}]}', "name, dtype and shape"),
        ('{"parameters": [{"name": "", "dtype": "float32", "shape": []}]}', "1 to 1024"),
        ('{"parameters": [{"name": 3, "dtype": "float32", "shape": []}]}', "must be a string"),
        ('{"parameters": [{"name": "w", "dtype": "complex64", "shape": [1]}]}', "complex64"),
        ('{"parameters": [{"name": "w", "dtype": "float32", "shape": [-1]}]}', "non-negative"),
        ('{"parameters": [{"name": "w", "dtype": "float32", "shape": [1.5]}]}', "non-negative"),
        ('{"parameters": [{"name": "w", "dtype": "float32", "shape": [true]}]}', "non-negative"),
        ('{"parameters": [{"name": "w", "dtype": "float32", "shape": "3"}]}', "list of at most"),
        (
            '{"parameters": [{"name": "w", "dtype": "float32", "shape": [' + "1," * 40 + "1]}]}",
            "at most 32",
        ),
        (
            '{"parameters": [{"name": "w", "dtype": "float32", "shape": [1]},'
            ' {"name": "w", "dtype": "float32", "shape": [2]}]}',
            "appears twice",
        ),
        ('{"error": "boom", "kind": "exception"}', "holds an error"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        (" " * ((8 << 20) + 1), "larger than 8 MiB"),
    ],
)
def test_an_answer_that_is_not_a_description_of_parameters_is_refused(raw: str, says: str) -> None:
    with pytest.raises(BadProbeOutput, match=says):
        parse_shapes(raw)


def test_a_well_formed_answer_gives_the_shapes() -> None:
    raw = json.dumps({"parameters": [{"name": "w", "dtype": "bfloat16", "shape": [2, 0]}]})
    assert parse_shapes(raw) == [TensorSpec("w", "bfloat16", (2, 0))]


# -- the probe process ----------------------------------------------------------------


def test_the_probe_learns_the_shapes_and_not_here(probe: ShapeProbe, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    ref = write_task(tmp_path / "task.py", mark=f"open({str(marker)!r}, 'a').write('x')")
    assert probe.shapes(ref, 8, 0) == SHAPES
    assert marker.read_text() == "x"  # imported once, in the probe
    assert not [m for m in list(sys.modules.values()) if getattr(m, "__file__", "") == ref]


def test_the_task_sees_none_of_the_controllers_secrets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ELASTICD_CLUSTER_TOKEN", "member-secret")
    monkeypatch.setenv("ELASTICD_TLS_KEY", "/etc/elasticd/node-key.pem")
    seen = tmp_path / "environment"
    ref = write_task(
        tmp_path / "task.py",
        mark=f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))",
    )
    p = ShapeProbe(timeout_s=60, memory_mib=MEMORY_MIB)
    try:
        assert p.shapes(ref, 8, 0) == SHAPES
    finally:
        p.close()
    environment = json.loads(seen.read_text())
    assert "PATH" in environment  # it did record the task's environment
    assert not [k for k in environment if k.startswith("ELASTICD_")]


BAD_TASKS = {
    "raises at import": ("raise ValueError('no corpus at /data/x')", "pass"),
    "raises in build_model": ("", "raise KeyError('width')"),
    "calls sys.exit": ("import sys; sys.exit(3)", "pass"),
    "segfaults": ("import ctypes; ctypes.string_at(0)", "pass"),
    "allocates at import": ("hog = bytearray(3 << 30)", "pass"),
    "allocates in build_model": ("", 'torch.empty(1 << 30, device="cpu")'),
    "writes a bad answer": (
        "import os; os.write(3, b'{\"parameters\": [7]}'); os._exit(0)",
        "pass",
    ),
    "exits without answer": ("print('bye from the task'); import os; os._exit(0)", "pass"),
}
SAYS = {
    "raises at import": "cannot be built: ValueError: no corpus at /data/x",
    "raises in build_model": "cannot be built: KeyError: 'width'",
    "calls sys.exit": r"called sys.exit\(3\)",
    "segfaults": "killed by SIGSEGV",
    "allocates at import": f"exceeded the {MEMORY_MIB} MiB memory limit",
    "allocates in build_model": f"exceeded the {MEMORY_MIB} MiB memory limit",
    "writes a bad answer": "name, dtype and shape",
    "exits without answer": "exited with code 0 without an answer: bye from the task",
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_a_bad_task_is_refused_with_what_happened(
    probe: ShapeProbe, tmp_path: Path, case: str
) -> None:
    mark, build = BAD_TASKS[case]
    ref = write_task(tmp_path / "task.py", mark=mark, build=build)
    with pytest.raises(TaskError, match=SAYS[case]):
        probe.shapes(ref, 8, 0)
    assert probe.shapes(write_task(tmp_path / "good.py"), 8, 0) == SHAPES  # still answering


def test_a_hanging_task_is_killed_with_its_whole_process_group(
    probe: ShapeProbe, tmp_path: Path
) -> None:
    pid_file = tmp_path / "helper.pid"
    mark = textwrap.dedent(f"""\
        import subprocess, sys, time
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(helper.pid))
        time.sleep(600)
        """)
    ref = write_task(tmp_path / "task.py", mark=mark)
    with pytest.raises(TaskError, match=f"timed out after {TIMEOUT_S:g} s"):
        probe.shapes(ref, 8, 0)
    helper = int(pid_file.read_text())
    wait_until(lambda: not _alive(helper), 30, f"the task's helper process {helper} to be killed")


def test_a_probe_process_killed_mid_question_fails_that_question_and_is_restarted(
    tmp_path: Path,
) -> None:
    """SIGKILL of the probe process itself (not the task): the question in flight gets
    ProbeUnavailable at once, not after its timeout, and the next one starts a new probe."""
    started = tmp_path / "started"
    ref = write_task(
        tmp_path / "slow.py", mark=f"open({str(started)!r}, 'w').write('x'); import time; "
        "time.sleep(600)"
    )  # fmt: skip
    p = ShapeProbe(timeout_s=600, memory_mib=MEMORY_MIB)
    try:
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(p.shapes, ref, 8, 0)
            wait_until(started.exists, 120, "the task to start importing")
            first = p._process.proc.pid
            os.killpg(first, signal.SIGKILL)
            with pytest.raises(ProbeUnavailable, match="exited"):
                asked.result(timeout=60)
        assert p.shapes(write_task(tmp_path / "good.py"), 8, 0) == SHAPES
        assert p._process.proc.pid != first
    finally:
        p.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_probe_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1024 MiB"):
        ShapeProbe(memory_mib=512)
    with pytest.raises(ValueError, match="positive"):
        ShapeProbe(timeout_s=0)


# -- the probe's sandbox: nothing outlives a question, limits bind, an unprivileged user --

# Forks a child that leaves the session, whose own child (a grandchild of the task,
# orphaned at once) writes its pid and sleeps; the task then does ``{then}``.
DETACH = """\
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open({pid_file!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
while not os.path.exists({pid_file!r}):
    time.sleep(0.01)
{then}
"""


@pytest.mark.parametrize("then", ["time.sleep(600)", "pass"], ids=["hangs", "returns"])
def test_a_grandchild_that_calls_setsid_does_not_outlive_the_question(
    probe: ShapeProbe, tmp_path: Path, then: str
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    ref = write_task(tmp_path / "task.py", mark=DETACH.format(pid_file=str(pid_file), then=then))
    if then == "pass":  # the task answers; what it left behind is killed
        assert probe.shapes(ref, 8, 0) == SHAPES
    else:  # the task hangs: killed at the timeout, with what left its session
        with pytest.raises(TaskError, match=f"timed out after {TIMEOUT_S:g} s"):
            probe.shapes(ref, 8, 0)
    grandchild = int(pid_file.read_text())
    wait_until(lambda: not _alive(grandchild), 10, f"the detached grandchild {grandchild} to go")


def test_a_task_that_allocates_without_bound_is_stopped_by_its_limit(
    probe: ShapeProbe, tmp_path: Path
) -> None:
    ref = write_task(
        tmp_path / "task.py", mark="hog = []\nwhile True:\n    hog.append(bytearray(64 << 20))"
    )
    with pytest.raises(TaskError, match=f"exceeded the {MEMORY_MIB} MiB memory limit"):
        probe.shapes(ref, 8, 0)


# -- as an unprivileged user ----------------------------------------------------------

# Records who it is, its limits, whether it can raise them, and its environment.
REPORT = """\
import json, os, resource
limits = {{}}
for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_CORE"):
    soft, hard = resource.getrlimit(getattr(resource, name))
    try:
        resource.setrlimit(getattr(resource, name), (resource.RLIM_INFINITY,) * 2)
        raised = True
    except (ValueError, OSError):
        raised = False
    limits[name] = [soft, hard, raised]
report = dict(uid=os.getuid(), gid=os.getgid(), groups=os.getgroups(), limits=limits,
              env=dict(os.environ), sid=os.getsid(0), pid=os.getpid())
open({out!r}, "w").write(json.dumps(report))
"""

# Run by the test's unprivileged-capable interpreter, as root: a controller's side.
DRIVER = """\
import json, sys
from elasticd.security.confinement import RunAs
from elasticd.shape_probe.client import ShapeProbe
p = ShapeProbe(timeout_s=30, memory_mib={memory}, run_as=RunAs.named({user!r}))
try:
    print(json.dumps([t.name for t in p.shapes({task!r}, 8, 0)]))
finally:
    p.close()
"""


@pytest.mark.slow
def test_the_probe_runs_as_the_unprivileged_user_under_limits_it_cannot_raise(
    unprivileged, unprivileged_python, open_dir: Path
) -> None:
    out_dir = open_dir / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)
    out = out_dir / "report.json"
    task = write_task(open_dir / "task.py", mark=REPORT.format(out=str(out)))
    Path(task).chmod(0o644)
    driver = DRIVER.format(memory=MEMORY_MIB, user=unprivileged.name, task=task)
    env = {"PATH": "/usr/bin:/bin", "ELASTICD_CLUSTER_TOKEN": "member-secret"}
    done = subprocess.run(
        [unprivileged_python, "-c", driver], capture_output=True, text=True, timeout=180, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [s.name for s in SHAPES]
    report = json.loads(out.read_text())
    assert (report["uid"], report["gid"]) == (unprivileged.uid, unprivileged.gid)
    assert set(report["groups"]) <= {unprivileged.gid}
    assert report["sid"] == report["pid"]  # its own session
    for name, (soft, hard, raised) in report["limits"].items():
        assert soft == hard != -1 and not raised, (name, soft, hard, raised)
    assert report["limits"]["RLIMIT_AS"][1] == MEMORY_MIB << 20
    assert not [k for k in report["env"] if k.startswith("ELASTICD_")], report["env"]
    assert report["env"]["HOME"] == unprivileged.home


# -- the controller ---------------------------------------------------------------------


def _spec(task: str, **fields):
    return load_spec_yaml(spec_yaml(task=task, **fields))


def test_submit_refuses_a_crashing_task_and_keeps_serving(etcd, keys, running, tmp_path):
    r = start_controller(etcd.endpoint, keys, "c0")
    running.append(r)
    wait_until(lambda: r.controller.is_leader, 30, "leadership")
    server, port = start_grpc_server(
        lambda s: job_pb2_grpc.add_JobServiceServicer_to_server(
            JobServiceServicer(r.controller), s
        ),
        "127.0.0.1",
        0,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = job_pb2_grpc.JobServiceStub(channel)
        crashing = write_task(tmp_path / "crash.py", mark="import ctypes; ctypes.string_at(0)")
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitJob(job_pb2.SubmitJobRequest(spec_yaml=spec_yaml(task=crashing)), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "killed by SIGSEGV" in err.value.details(), err.value.details()
        assert r.controller.job_ids() == []  # nothing admitted, nothing written

        good = write_task(tmp_path / "good.py")
        reply = stub.SubmitJob(job_pb2.SubmitJobRequest(spec_yaml=spec_yaml(task=good)), timeout=60)
        assert r.controller.job_ids() == [reply.job_id]
    finally:
        channel.close()
        server.stop(grace=None).wait()


def _register_ps(session, keys: Keys, ps_cluster) -> None:
    for ps in ps_cluster.start(1):
        session.put(keys.ps(ps.ps_id), json.dumps({"address": ps.address, "incarnation": "i0"}))


def test_shapes_are_probed_once_at_submit_and_read_by_a_new_leader(
    etcd, keys, running, nodes, ps_cluster, etcd_client, tmp_path
):
    """Submit on a, which cannot place the job (no PS); b leads after a stops and places it
    from the shapes a stored. The task ran once, in a's probe, never in either controller."""
    marker = tmp_path / "imported"
    ref = write_task(
        tmp_path / "task.py",
        mark=f"import os; open({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')",
    )
    a = start_controller(etcd.endpoint, keys, "a")
    running.append(a)
    wait_until(lambda: a.controller.is_leader, 30, "a to lead")
    job_id = a.controller.submit(_spec(ref))
    stored = etcd_client.get(keys.job_tensors(job_id))
    assert stored is not None and list(tensors_from_json(stored.value)) == SHAPES
    a.close()
    running.remove(a)

    session = nodes(1)
    _register_ps(session, keys, ps_cluster)
    b = start_controller(etcd.endpoint, keys, "b")
    running.append(b)
    placed = wait_until(
        lambda: b.controller.snapshot(job_id).placement, 30, "b to place the job on the PS"
    )
    assert {s.param for s in placed.slices} == {t.name for t in SHAPES}
    assert b.controller.shapes.probe.probes == 0  # b read the stored shapes

    pids = marker.read_text().split()
    assert len(pids) == 1 and int(pids[0]) != os.getpid()
    assert not [m for m in list(sys.modules.values()) if getattr(m, "__file__", "") == ref]


def test_a_job_admitted_without_stored_shapes_is_probed_once_on_first_use(
    etcd, keys, running, nodes, ps_cluster, etcd_client, tmp_path
):
    """As an older controller admitted it: spec and record, no shapes."""
    marker = tmp_path / "imported"
    ref = write_task(tmp_path / "task.py", mark=f"open({str(marker)!r}, 'a').write('x')")
    session = nodes(1)
    _register_ps(session, keys, ps_cluster)
    job_id, ops = admission.new_job(_spec(ref, workers={"min": 1, "max": 1}), keys)
    etcd_client.transaction([], ops)
    c = start_controller(etcd.endpoint, keys, "c")
    running.append(c)
    wait_until(lambda: c.controller.snapshot(job_id).placement, 30, "the job to be placed")
    stored = wait_until(lambda: etcd_client.get(keys.job_tensors(job_id)), 30, "stored shapes")
    assert list(tensors_from_json(stored.value)) == SHAPES
    assert {s.param for s in c.controller.snapshot(job_id).placement.slices} == {
        t.name for t in SHAPES
    }
    assert c.controller.shapes.probe.probes == 1
    assert marker.read_text() == "x"
