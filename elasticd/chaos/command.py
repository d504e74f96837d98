"""`elasticd chaos`: its arguments and what it prints."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from elasticd.coord.keys import DEFAULT_PREFIX

DEFAULT_KINDS = "kill:worker,stop:worker,stop:agent,stop:ps"

DESCRIPTION = """\
Run a job against a running cluster while injecting faults on a seeded schedule,
then write a report directory: report.json (every fault, when it was detected and
when the job recovered, medians and maxima), report.png (loss and steps/s against
time, faults marked, recovery gaps shaded) and report.md.

Fault kinds are ACTION:ROLE: ACTION is kill (SIGKILL) or stop (SIGSTOP, then
SIGCONT after --stop-s); ROLE is worker (a training process of the job), agent,
ps, controller (whoever leads when the fault is due) or etcd. One fault comes per
--interval seconds for --duration seconds; every kind is dealt once per round.
The same --seed gives the same schedule.

Two ways to reach the processes:
  --injector local (default)  a cluster started by `elasticd up` on this machine:
                              its state file (<dir>/cluster.json) names every
                              daemon's pid; all roles can be hit. Nothing restarts a
                              killed daemon there, so kill:agent, kill:ps and
                              kill:controller end that daemon for good; kill:etcd
                              needs more than one etcd member.
  --injector agent            a real cluster: the agents' InjectFault RPC, which
                              agents serve only when started with --allow-chaos;
                              roles worker and agent only.

Detected after: seconds from a fault until the job's view changes (a new
generation, a worker gone or restarted, another leader or PS set, the controller
not answering). Recovered after: seconds from the fault until, after detection,
the job's step is past where it stood at the fault.

example:
  elasticd up --ps 2 --agents 2 &
  elasticd chaos examples/linreg.yaml --faults kill:worker,stop:agent \\
      --duration 40 --interval 20 --seed 7 --baseline --out chaos-report
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the job spec (YAML) to run under faults")
    p.add_argument("--out", default="chaos-report", help="report directory (created)")
    p.add_argument(
        "--faults",
        default=DEFAULT_KINDS,
        metavar="KINDS",
        help=f"comma-separated ACTION:ROLE fault kinds (default: {DEFAULT_KINDS})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule")
    p.add_argument(
        "--duration", type=float, default=60.0, help="seconds of the run in which faults come"
    )
    p.add_argument("--interval", type=float, default=15.0, help="seconds between faults")
    p.add_argument(
        "--stop-s", type=float, default=5.0, help="seconds a stopped process stays stopped"
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="the schedule starts once the job has passed this step",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="first run the same job once without faults, and compare final losses",
    )
    p.add_argument(
        "--injector",
        choices=("local", "agent"),
        default="local",
        help="local: signal pids of an `elasticd up` cluster; agent: agents' InjectFault RPC",
    )
    p.add_argument(
        "--state",
        default=".elasticd/cluster.json",
        help="the local cluster's state file, or its --dir (local injector)",
    )
    p.add_argument(
        "--etcd",
        default=os.environ.get("ELASTICD_ETCD", "127.0.0.1:2379"),
        help="etcd endpoints of the cluster (agent injector; env ELASTICD_ETCD)",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix (agent injector)")
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds to wait for each job to get going and to end",
    )


def _interrupt(signum, _frame):
    raise KeyboardInterrupt  # so that every stopped process is resumed on the way out


def run(args: argparse.Namespace) -> int:
    from elasticd.chaos.runner import ChaosOptions, run_chaos
    from elasticd.chaos.schedule import ScheduleError, parse_kinds
    from elasticd.serving import configure_logging

    configure_logging("chaos")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        opts = ChaosOptions(
            spec=args.spec,
            out_dir=args.out,
            kinds=parse_kinds(args.faults),
            seed=args.seed,
            duration_s=args.duration,
            interval_s=args.interval,
            stop_s=args.stop_s,
            baseline=args.baseline,
            injector=args.injector,
            state_path=args.state,
            etcd=args.etcd,
            prefix=args.prefix,
            warmup_steps=args.warmup_steps,
            timeout_s=args.timeout,
        )
        report = run_chaos(opts)
    except (ScheduleError, ValueError) as exc:
        print(f"elasticd chaos: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TimeoutError) as exc:
        print(f"elasticd chaos: stopped ({str(exc) or 'interrupted'}); stopped processes resumed",
              file=sys.stderr)  # fmt: skip
        return 1
    s, final = report["summary"], report["final"]
    print(f"job {report['job_id']} {final['state']} at step {final['step']}, loss {final['loss']}")
    print(
        f"faults: {s['injected']} injected, {s['detected']} detected, {s['recovered']} recovered; "
        f"detection median {s['detection_s']['median']} s max {s['detection_s']['max']} s; "
        f"recovery median {s['recovery_s']['median']} s max {s['recovery_s']['max']} s"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"report: {os.path.join(args.out, 'report.md')}", flush=True)
    return 0 if final["state"] == "COMPLETED" else 1
