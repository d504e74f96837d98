"""The ``elasticd`` command line: one subcommand per process, plus the client."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path

import grpc

from elasticd.coord.keys import DEFAULT_PREFIX
from elasticd.security.config import SecurityError, add_security_arguments, resolve

DESCRIPTION = """\
elasticd: fault-tolerant elastic training for PyTorch.

Processes (each its own subcommand, all pointed at one etcd):
  controller   the job service; admits jobs, seals membership, orders checkpoints
  ps           a parameter server holding shards of jobs' parameters
  agent        one per node; runs and restarts the training processes assigned to it
  up           all of the above on this machine (local mode), with its own etcd

Client:
  submit       submit a job spec (YAML)
  status       show one job or all jobs
  cancel       cancel a job
  switch       switch a running job between ps-async and allreduce
  logs         print a worker's log (local mode)
  chaos        run a job under injected faults and report detection and recovery
"""


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--etcd",
        default=os.environ.get("ELASTICD_ETCD", "127.0.0.1:2379"),
        help="etcd endpoints used to find the leading controller (env ELASTICD_ETCD)",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix of the cluster")
    p.add_argument("--controller", default=None, help="controller address host:port (skips etcd)")
    add_security_arguments(p, server=False)


def _client(args):
    from elasticd.client import JobClient

    try:
        security = resolve(args)
    except SecurityError as exc:
        raise SystemExit(f"elasticd: {exc}") from exc
    return JobClient(
        controller=args.controller,
        etcd=None if args.controller else args.etcd,
        prefix=args.prefix,
        security=security,
    )


def progress_line(s) -> str:
    loss = "-" if math.isnan(s.loss) else f"{s.loss:.4f}"
    return (
        f"[{s.state}] gen {s.generation}  workers {len(s.workers)}  "
        f"step {s.step}/{s.total_steps}  loss {loss}"
    )


def follow(client, job_id: str, timeout: float, out=sys.stdout):
    last = [""]

    def show(s):
        line = progress_line(s)
        if line != last[0]:
            print(line, file=out, flush=True)
            last[0] = line

    return client.wait(job_id, timeout=timeout, on_update=show)


def print_result(s, out=sys.stdout) -> None:
    first = "-" if math.isnan(s.first_loss) else f"{s.first_loss:.4f}"
    last = "-" if math.isnan(s.loss) else f"{s.loss:.4f}"
    print(f"job {s.job_id} {s.state}: {s.message}", file=out)
    print(f"  steps       {s.step}/{s.total_steps}", file=out)
    print(f"  first loss  {first}", file=out)
    print(f"  final loss  {last}", file=out)
    print(f"  checkpoint  {s.checkpoint or '-'}", file=out, flush=True)


def cmd_submit(args) -> int:
    from elasticd.client import format_status
    from elasticd.jobspec import SpecError

    client = _client(args)
    try:
        job_id = client.submit_file(args.spec, args.resume_from or "")
    except SpecError as exc:
        print(f"elasticd submit: {args.spec}: {exc}", file=sys.stderr)
        return 2
    print(job_id, flush=True)
    if args.follow:
        status = follow(client, job_id, args.timeout)
        print(format_status(status))
        return 0 if status.state == "COMPLETED" else 1
    return 0


def cmd_status(args) -> int:
    from elasticd.client import format_status

    client = _client(args)
    if args.job:
        s = client.get(args.job)
        print(format_status(s))
        for w in s.workers:
            loss = "-" if math.isnan(w.loss) else f"{w.loss:.4f}"
            print(f"  rank {w.rank:<3} {w.worker_id:<24} {w.state:<9} step={w.step} loss={loss}")
        if s.message:
            print(f"  {s.message}")
    else:
        jobs = client.list()
        if not jobs:
            print("no jobs")
        for s in jobs:
            print(format_status(s))
    return 0


def cmd_cancel(args) -> int:
    from elasticd.client import format_status

    print(format_status(_client(args).cancel(args.job)))
    return 0


def cmd_switch(args) -> int:
    from elasticd.client import format_status

    print(format_status(_client(args).switch(args.job, args.mode)))
    return 0


def cmd_logs(args) -> int:
    root = Path(args.log_dir) / args.job
    files = sorted(root.glob(f"{args.worker or '*'}.log"))
    if not files:
        print(f"elasticd logs: no logs under {root}", file=sys.stderr)
        return 1
    for f in files:
        print(f"==> {f} <==")
        sys.stdout.write(f.read_text(errors="replace"))
    return 0


def cmd_up(args) -> int:
    from elasticd.client import JobClient
    from elasticd.local import LocalCluster

    pki = None
    if args.tls:
        from elasticd.security.local_pki import make_local_pki

        pki = make_local_pki(Path(args.dir).resolve() / "tls")
    cpus = os.cpu_count() or 1
    cluster = LocalCluster(
        args.dir,
        prefix=args.prefix,
        threads_per_worker=max(1, cpus // max(args.agents, 1)),
        pki=pki,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    code = 0
    try:
        cluster.start_etcd(args.etcd_port, fresh=args.fresh)
        cluster.start(ps=args.ps, agents=args.agents)
        print("elasticd local cluster is up:", flush=True)
        for name, address in cluster.addresses().items():
            print(f"  {name:<12} {address}", flush=True)
        print(f"  logs         {cluster.base_dir / 'logs'}", flush=True)
        if pki is not None:
            print(f"  clients      export ELASTICD_CONFIG={pki.client_config}", flush=True)
        if args.submit:
            client = JobClient(
                etcd=cluster.etcd, prefix=args.prefix, security=cluster.client_security()
            )
            job_id = client.submit_file(args.submit)
            print(f"submitted {args.submit} as job {job_id}", flush=True)
            status = follow(client, job_id, args.timeout)
            print_result(status)
            code = 0 if status.state == "COMPLETED" else 1
            client.close()
            if args.stop_when_done:
                return code
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        return code
    except (KeyboardInterrupt, TimeoutError, grpc.RpcError) as exc:
        if not isinstance(exc, KeyboardInterrupt):
            print(f"elasticd up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping the local cluster", flush=True)
        cluster.stop()


def build_parser() -> argparse.ArgumentParser:
    from elasticd.server.controller import main as controller_main
    from elasticd.server.ps import main as ps_main
    from elasticd.worker.agent import main as agent_main

    parser = argparse.ArgumentParser(
        prog="elasticd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    servers = (
        ("controller", controller_main, "run a controller (job service, leader-elected)",
         "Run a controller: the job service. Several may run; one leads."),
        ("ps", ps_main, "run a parameter server",
         "Run a parameter server holding shards of jobs' parameters."),
        ("agent", agent_main, "run a node agent",
         "Run the node agent: starts, watches and restarts training processes."),
    )  # fmt: skip
    for name, module, help_, description in servers:
        p = sub.add_parser(name, help=help_, description=description)
        module.add_arguments(p)
        p.set_defaults(func=module.run)

    p = sub.add_parser(
        "up",
        help="run a local cluster on this machine",
        description="Start etcd, a controller, parameter servers and agents on loopback; "
        "optionally submit a job and follow it. Ctrl-C stops everything.",
    )
    p.add_argument("--ps", type=int, default=2, help="parameter servers to start")
    p.add_argument("--agents", type=int, default=2, help="node agents to start")
    p.add_argument(
        "--dir", default=".elasticd", help="state directory (etcd data, logs, checkpoints)"
    )
    p.add_argument(
        "--etcd-port", type=int, default=None, help="etcd client port (default: a free port)"
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="forget the jobs of an earlier run in --dir (they resume by default)",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix")
    p.add_argument(
        "--submit", metavar="SPEC", default=None, help="submit this job spec once the cluster is up"
    )
    p.add_argument(
        "--stop-when-done", action="store_true", help="stop the cluster when the submitted job ends"
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds to follow a submitted job")
    p.add_argument(
        "--tls",
        action="store_true",
        help="run closed: a throw-away CA and certificates under DIR/tls, mutual TLS on every "
        "port (etcd's too), a cluster token and an admin token; clients use "
        "ELASTICD_CONFIG=DIR/tls/client.yaml",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("submit", help="submit a job spec", description="Submit a job spec (YAML).")
    p.add_argument("spec", help="path to the job spec")
    p.add_argument("--follow", action="store_true", help="follow the job's progress until it ends")
    p.add_argument(
        "--resume-from",
        metavar="JOB_ID|URL",
        default=None,
        help="start from a checkpoint: a job's newest verified one, or a checkpoint's URL "
        "(to revive a failed or cancelled job, or to fine-tune from it)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds to follow")
    _client_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show jobs", description="Show one job, or all jobs.")
    p.add_argument("job", nargs="?", help="job id (default: all jobs)")
    _client_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job", description="Cancel a job.")
    p.add_argument("job", help="job id")
    _client_args(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "switch",
        help="switch a running job between ps-async and allreduce",
        description="Switch a running job between ps-async and allreduce at its next step "
        "boundary; parameters and optimizer state move with it.",
    )
    p.add_argument("job", help="job id")
    p.add_argument("mode", choices=("ps-async", "allreduce"), help="the mode to train in")
    _client_args(p)
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("logs", help="print worker logs", description="Print a job's worker logs.")
    p.add_argument("job", help="job id")
    p.add_argument("--worker", default=None, help="worker id (default: all)")
    p.add_argument("--log-dir", default=".elasticd/logs", help="agents' log directory")
    p.set_defaults(func=cmd_logs)

    from elasticd.chaos import command as chaos_command

    p = sub.add_parser(
        "chaos",
        help="run a job under seeded faults; report detection and recovery",
        description=chaos_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chaos_command.add_arguments(p)
    p.set_defaults(func=chaos_command.run)

    p = sub.add_parser(
        "checkpoint",
        help="checkpoint a job now (JOB), or list, verify, export checkpoints (ls|verify|export URL)",
        add_help=False,  # `elasticd checkpoint --help` is answered by the subcommand's parser
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_checkpoint)
    return parser


TOOLS = ("ls", "verify", "export", "-h", "--help")


def cmd_checkpoint(args) -> int:
    """`checkpoint ls|verify|export URL` reads storage; `checkpoint JOB` asks the controller."""
    if args.rest[:1] and args.rest[0] not in TOOLS:
        from elasticd.client import format_status

        p = argparse.ArgumentParser(prog="elasticd checkpoint", description="Checkpoint a job now.")
        p.add_argument("job", help="job id")
        _client_args(p)
        job_args = p.parse_args(args.rest)
        print(format_status(_client(job_args).checkpoint(job_args.job)))
        return 0
    from elasticd.checkpoint.tools import main as checkpoint_main

    return checkpoint_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["checkpoint"]:  # its own parsers, so that their --help is their own
        args = argparse.Namespace(command="checkpoint", func=cmd_checkpoint, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except grpc.RpcError as exc:
        print(f"elasticd {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ConnectionError, FileNotFoundError) as exc:
        print(f"elasticd {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
