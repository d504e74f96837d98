"""script mode: an unmodified torchrun-style script under elasticd."""

from __future__ import annotations

import os
import re
import signal

import torch

from elasticd.client import JobClient
from elasticd.retry import wait_until
from tests.jobs import EXAMPLES, spec_yaml
from tests.test_join_when_ready import warm_pids
from tests.test_local_cluster import processes_of_job

STEPS = 300


def snapshot_step(path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def test_killed_rank_restarts_every_process_with_the_count_raised_and_it_resumes(cluster, tmp_path):
    c = cluster(ps=0, agents=2)
    snap = tmp_path / "snapshot.pt"
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(
        spec_yaml(
            mode="script",
            script={
                "path": str(EXAMPLES / "torchrun_script.py"),
                "args": ["--snapshot", str(snap), "--steps", str(STEPS), "--step-delay", "0.02"],
            },
            workers={"min": 2, "max": 2},
        )
    )
    wait_until(lambda: snapshot_step(snap) >= 30, 90, "the script to snapshot step 30")
    running = {w: p.pid for w in ("node-0.0", "node-1.0") for p in processes_of_job(job_id, w)}
    warm = {
        w: wait_until(lambda w=w, b=pid: warm_pids(c, w.split(".")[0], b), 60, f"warm for {w}")
        for w, pid in running.items()
    }
    rank1 = next(p for p in processes_of_job(job_id) if p.environ().get("RANK") == "1")
    os.kill(rank1.pid, signal.SIGKILL)

    status = client.wait(job_id, timeout=180, interval=0.5)
    assert status.state == "COMPLETED", status
    assert status.generation >= 2  # the failure restarted the job in a new generation
    assert status.restarts >= 1  # `elasticd status` shows it
    assert [w.state for w in status.workers] == ["SUCCEEDED", "SUCCEEDED"]
    assert snapshot_step(snap) == STEPS

    logs = {
        w: (c.base_dir / "logs" / job_id / f"{w}.log").read_text() for w in ("node-0.0", "node-1.0")
    }
    for worker, text in logs.items():
        starts = re.findall(r"rank=(\d) world=(\d) restart_count=(\d+) resume_step=(\d+)", text)
        assert starts[0][2:] == ("0", "0"), (worker, starts)
        # Restarted with the count raised, resuming from its own snapshot, not from 0.
        restarted = [s for s in starts if int(s[2]) >= 1]
        assert restarted, (worker, text[-2000:])
        assert int(restarted[-1][3]) >= 30
        assert f"done at step {STEPS}" in text
    # Every restarted process was a warm interpreter, started before the failure.
    agents = "".join(p.read_text() for p in (c.base_dir / "logs").glob("node-*.log"))
    for worker, pids in warm.items():
        relaunched = re.findall(
            rf"event=worker_launched job={job_id} generation=\d+ node=\S+ worker={worker} "
            r"pid=(\d+) restarts=[1-9]",
            agents,
        )
        assert relaunched and int(relaunched[0]) in pids, (worker, relaunched, pids)
    assert "event=process_adopted" in agents
    client.close()


def test_script_gets_torchruns_environment(cluster, tmp_path):
    c = cluster(ps=0, agents=2)
    out = tmp_path / "env"
    script = tmp_path / "print_env.py"
    script.write_text(
        "import os, sys, json\n"
        "keys = ['RANK','LOCAL_RANK','WORLD_SIZE','LOCAL_WORLD_SIZE','GROUP_RANK','ROLE_RANK',\n"
        "        'MASTER_ADDR','MASTER_PORT','TORCHELASTIC_RESTART_COUNT',\n"
        "        'TORCHELASTIC_MAX_RESTARTS','TORCHELASTIC_RUN_ID']\n"
        "open(sys.argv[1] + os.environ['RANK'], 'w').write(json.dumps({k: os.environ[k] for k in keys}))\n"
    )
    client = JobClient(etcd=c.etcd, prefix=c.prefix)
    job_id = client.submit_yaml(
        spec_yaml(
            mode="script",
            script={"path": str(script), "args": [str(out)]},
            workers={"min": 2, "max": 2},
            max_restarts=5,
        )
    )
    status = client.wait(job_id, timeout=60, interval=0.2)
    assert status.state == "COMPLETED"
    # Its ranks as their agents last reported them, not STARTING; no steps it cannot count.
    assert [w.state for w in status.workers] == ["SUCCEEDED", "SUCCEEDED"]
    assert status.total_steps == 0 and status.restarts == 0
    import json

    envs = [json.loads((tmp_path / f"env{r}").read_text()) for r in (0, 1)]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "1"
        assert env["LOCAL_RANK"] == "0" and env["GROUP_RANK"] == str(rank)
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "5"
        assert env["TORCHELASTIC_RUN_ID"] == job_id
        assert env["MASTER_ADDR"] == "127.0.0.1"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    client.close()


def test_a_scripts_top_level_imports_are_read_from_its_source(tmp_path):
    from elasticd.worker.agent.launch import script_imports

    script = tmp_path / "train.py"
    script.write_text(
        "import os, torch.distributed as dist\n"
        "from torch.nn.parallel import DistributedDataParallel\n"
        "from . import sibling\n"
        "if os.environ.get('X'):\n    import numpy\n"
        "def main():\n    import json\n"
        "raise SystemExit('never run')\n"
    )
    assert script_imports(str(script)) == ("os", "torch.distributed", "torch.nn.parallel")
    broken = tmp_path / "broken.py"
    broken.write_text("import (\n")
    assert script_imports(str(broken)) == ()
