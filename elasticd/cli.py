"""The ``elasticd`` command line: one subcommand per process, plus the client."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import grpc

from elasticd import cli_jobs
from elasticd.coord.keys import DEFAULT_PREFIX

DESCRIPTION = """\
elasticd: fault-tolerant elastic training for PyTorch.

Processes (each its own subcommand, all pointed at one etcd):
  controller   the job service; admits jobs, seals membership, orders checkpoints
  ps           a parameter server holding shards of jobs' parameters
  agent        one per node; runs and restarts the training processes assigned to it
  up           all of the above on this machine (local mode), with its own etcd

Client:
  submit       submit a job spec (YAML); --follow shows its progress until it ends
  status       show one job (its ranks, restarts) or all jobs
  ls           list jobs, filtered by state, name, mode, owner
  cancel       cancel a job
  switch       switch a running job between ps-async and allreduce
  scale        change a running job's workers.min and workers.max
  checkpoint   checkpoint a job now (or list, verify, export checkpoints)
  logs         print a worker's log (local mode)
  chaos        run a job under injected faults and report detection and recovery
"""


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
    from elasticd.cli_jobs import ended_code, print_result
    from elasticd.client import JobClient
    from elasticd.follow import follow
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
        metrics=True,
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
        for name, url in sorted(cluster.wait_metrics(30).items()):
            print(f"  metrics      {url}  ({name})", flush=True)
        print(f"  logs         {cluster.base_dir / 'logs'}", flush=True)
        if pki is not None:
            print(f"  clients      export ELASTICD_CONFIG={pki.client_config}", flush=True)
        if args.submit:
            client = JobClient(
                etcd=cluster.etcd, prefix=args.prefix, security=cluster.client_security()
            )
            job_id = client.submit_file(args.submit)
            print(f"submitted {args.submit} as job {job_id}", flush=True)
            status = follow(client.watch(job_id))
            print_result(status)
            code = ended_code(status)
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
        epilog=cli_jobs.EXIT_CODES,
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
        p.set_defaults(func=module.run, daemon=True)

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
    p.add_argument(
        "--tls",
        action="store_true",
        help="run closed: a throw-away CA and certificates under DIR/tls, mutual TLS on every "
        "port (etcd's too), a cluster token and an admin token; clients use "
        "ELASTICD_CONFIG=DIR/tls/client.yaml",
    )
    p.set_defaults(func=cmd_up)
    cli_jobs.add_parsers(sub)

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
BAD_INPUT = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def cmd_checkpoint(args) -> int:
    """`checkpoint ls|verify|export URL` reads storage; `checkpoint JOB` asks the controller."""
    if args.rest[:1] and args.rest[0] not in TOOLS:
        return cli_jobs.cmd_checkpoint_job(args.rest)
    from elasticd.checkpoint.tools import main as checkpoint_main

    return checkpoint_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["checkpoint"]:  # its own parsers, so that their --help is their own
        args = argparse.Namespace(command="checkpoint", func=cmd_checkpoint, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        code = args.func(args) or 0
        if getattr(args, "daemon", False):
            from elasticd.serving import exit_without_teardown

            exit_without_teardown(code)
        return code
    except grpc.RpcError as exc:
        code = exc.code()
        where = getattr(getattr(args, "client", None), "address", "") or "the controller"
        print(
            f"elasticd {args.command}: {code.name} from {where}: {exc.details()}", file=sys.stderr
        )
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return cli_jobs.EXIT_UNREACHABLE
        if code in BAD_INPUT:
            return cli_jobs.EXIT_BAD_INPUT
        return cli_jobs.EXIT_JOB_FAILED
    except ConnectionError as exc:  # elasticd.client.Unreachable names what it tried
        print(f"elasticd {args.command}: {exc}", file=sys.stderr)
        return cli_jobs.EXIT_UNREACHABLE
    except FileNotFoundError as exc:
        print(f"elasticd {args.command}: {exc}", file=sys.stderr)
        return cli_jobs.EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
