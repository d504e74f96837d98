"""The client subcommands of ``elasticd``: submit, status, ls, cancel, switch, scale,
checkpoint JOB. Each returns its exit code (see EXIT_CODES)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from elasticd.coord.keys import DEFAULT_PREFIX
from elasticd.security.config import SecurityError, add_security_arguments, resolve

EXIT_OK = 0  # the job completed, or the request was done
EXIT_JOB_FAILED = 1  # the job failed or was cancelled (or another error)
EXIT_BAD_INPUT = 2  # a malformed spec or flag, an unknown job, a request that cannot apply
EXIT_UNREACHABLE = 3  # neither etcd nor a controller answered: the address tried is named

EXIT_CODES = """\
exit codes:
  0  the job completed (submit --follow), or the request was done
  1  the job failed or was cancelled
  2  bad input: a malformed spec (every bad field is listed), a bad flag, an unknown job,
     or a request the job cannot take (scaling a job that has ended)
  3  the cluster is unreachable: the etcd endpoints or controller address tried are named
"""

STATES = ("PENDING", "WAITING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")


def client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--etcd",
        default=os.environ.get("ELASTICD_ETCD", "127.0.0.1:2379"),
        help="etcd endpoints used to find the leading controller (env ELASTICD_ETCD)",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix of the cluster")
    p.add_argument("--controller", default=None, help="controller address host:port (skips etcd)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to keep trying to reach the cluster, across a controller fail-over "
        "(default 30); then exit 3",
    )
    add_security_arguments(p, server=False)


def make_client(args):
    from elasticd.client import JobClient

    try:
        security = resolve(args)
    except SecurityError as exc:
        print(f"elasticd: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from exc
    args.client = JobClient(
        controller=args.controller,
        etcd=None if args.controller else args.etcd,
        prefix=args.prefix,
        retry_deadline_s=args.connect_timeout,
        security=security,
    )
    return args.client


def as_json(status) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _emit(args, status) -> None:
    from elasticd.client import format_status

    print(json.dumps(as_json(status)) if args.json else format_status(status), flush=True)


def print_result(s, out=None) -> None:
    out = sys.stdout if out is None else out
    first = "-" if math.isnan(s.first_loss) else f"{s.first_loss:.4f}"
    last = "-" if math.isnan(s.loss) else f"{s.loss:.4f}"
    print(f"job {s.job_id} {s.state}: {s.message}", file=out)
    steps = f"{s.step}/{s.total_steps}" if s.total_steps else "-"
    print(f"  steps       {steps}", file=out)
    print(f"  restarts    {s.restarts}", file=out)
    print(f"  first loss  {first}", file=out)
    print(f"  final loss  {last}", file=out)
    print(f"  checkpoint  {s.checkpoint or '-'}", file=out, flush=True)


def ended_code(status) -> int:
    return EXIT_OK if status.state == "COMPLETED" else EXIT_JOB_FAILED


def cmd_submit(args) -> int:
    from elasticd.follow import follow
    from elasticd.jobspec import SpecError

    client = make_client(args)
    try:
        job_id = client.submit_file(args.spec, args.resume_from or "")
    except SpecError as exc:
        for error in exc.errors:
            print(f"elasticd submit: {args.spec}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.follow:
        print(json.dumps({"job_id": job_id}) if args.json else job_id, flush=True)
        return EXIT_OK
    if args.json:  # one JSON object: the final status
        *_, status = client.watch(job_id)
        print(json.dumps(as_json(status)), flush=True)
        return ended_code(status)
    print(job_id, flush=True)
    status = follow(client.watch(job_id))
    print_result(status)
    return ended_code(status)


def _worker_lines(s) -> list[str]:
    lines = []
    for w in s.workers:
        loss = "-" if math.isnan(w.loss) else f"{w.loss:.4f}"
        progress = f"step={w.step} loss={loss}" if s.total_steps else f"restarts={w.restarts}"
        lines.append(f"  rank {w.rank:<3} {w.worker_id:<24} {w.state:<10} {progress}")
    return lines


def cmd_status(args) -> int:
    from elasticd.client import format_status

    client = make_client(args)
    if not args.job:
        return cmd_ls(args)
    s = client.get(args.job)
    if args.json:
        print(json.dumps(as_json(s)), flush=True)
        return EXIT_OK
    print(format_status(s))
    for line in _worker_lines(s):
        print(line)
    if s.message:
        print(f"  {s.message}")
    return EXIT_OK


def cmd_ls(args) -> int:
    from elasticd.client import format_status

    client = getattr(args, "client", None) or make_client(args)
    jobs = client.list(
        states=[x.upper() for x in getattr(args, "state", None) or ()],
        name=getattr(args, "name", "") or "",
        mode=getattr(args, "mode", "") or "",
        owner=getattr(args, "owner", "") or "",
    )
    if args.json:
        print(json.dumps([as_json(s) for s in jobs]), flush=True)
        return EXIT_OK
    if not jobs:
        print("no jobs")
    for s in jobs:
        print(format_status(s))
    return EXIT_OK


def cmd_cancel(args) -> int:
    _emit(args, make_client(args).cancel(args.job))
    return EXIT_OK


def cmd_switch(args) -> int:
    _emit(args, make_client(args).switch(args.job, args.mode))
    return EXIT_OK


def cmd_scale(args) -> int:
    wmax = args.max if args.max is not None else args.min
    _emit(args, make_client(args).scale(args.job, args.min, wmax))
    return EXIT_OK


def cmd_checkpoint_job(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="elasticd checkpoint", description="Checkpoint a job now.", epilog=EXIT_CODES
    )
    _job_args(p)
    args = p.parse_args(argv)
    _emit(args, make_client(args).checkpoint(args.job))
    return EXIT_OK


def _job_args(p: argparse.ArgumentParser, *more: tuple[str, dict]) -> None:
    p.add_argument("job", help="job id")
    for name, kwargs in more:
        p.add_argument(name, **kwargs)
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    client_args(p)


def _parser(sub, name: str, help_: str, description: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help_,
        description=description,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def add_parsers(sub) -> None:
    p = _parser(
        sub,
        "submit",
        "submit a job spec",
        "Submit a job spec (YAML). With --follow, show its progress until it ends: a live "
        "bar on a terminal, plain lines otherwise; the exit code tells how it ended.",
        cmd_submit,
    )
    p.add_argument("spec", help="path to the job spec")
    p.add_argument("--follow", action="store_true", help="follow the job's progress until it ends")
    p.add_argument(
        "--resume-from",
        metavar="JOB_ID|URL",
        default=None,
        help="start from a checkpoint: a job's newest verified one, or a checkpoint's URL "
        "(to revive a failed or cancelled job, or to fine-tune from it)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the job id (with --follow: the final status)"
    )
    client_args(p)

    p = _parser(sub, "status", "show jobs", "Show one job and its ranks, or all jobs.", cmd_status)
    p.add_argument("job", nargs="?", help="job id (default: all jobs)")
    p.add_argument("--json", action="store_true", help="print one JSON object (array: all jobs)")
    client_args(p)

    p = _parser(sub, "ls", "list jobs", "List jobs, filtered by state, name, mode, owner.", cmd_ls)
    p.add_argument(
        "--state",
        action="append",
        type=str.upper,
        choices=STATES,
        metavar="STATE",
        help=f"only jobs in this state (repeatable): {', '.join(STATES)}",
    )
    p.add_argument("--name", default="", help="only jobs of this spec name")
    p.add_argument("--mode", default="", help="only jobs training in this mode")
    p.add_argument("--owner", default="", help="only jobs this identity submitted")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    client_args(p)

    p = _parser(sub, "cancel", "cancel a job", "Cancel a job.", cmd_cancel)
    _job_args(p)

    p = _parser(
        sub,
        "switch",
        "switch a running job between ps-async and allreduce",
        "Switch a running job between ps-async and allreduce at its next step "
        "boundary; parameters and optimizer state move with it.",
        cmd_switch,
    )
    _job_args(p, ("mode", {"choices": ("ps-async", "allreduce"), "help": "the mode to train in"}))

    p = _parser(
        sub,
        "scale",
        "change a running job's worker bounds",
        "Change how many workers a job that has not ended trains on: the next planning "
        "decision uses the new bounds, and a new leader keeps them.",
        cmd_scale,
    )
    _job_args(
        p,
        ("--min", {"type": int, "required": True, "help": "workers.min: the job waits below it"}),
        ("--max", {"type": int, "default": None, "help": "workers.max (default: --min)"}),
    )
