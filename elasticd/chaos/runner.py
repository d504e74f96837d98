"""One chaos run: (a baseline,) the job, the faults on their schedule, the report.

The order of events: the job is submitted and observed; once it has passed
``warmup_steps`` the schedule's clock starts; each fault is injected when it
is due, and each stopped process is resumed ``stop_s`` later; then the run
waits for the job to end. However it ends (the job done, a timeout, Ctrl-C,
an error), every process still stopped gets SIGCONT before anything else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from elasticd.chaos.injectors import AgentInjector, Injection, Injector, LocalInjector, resume_all
from elasticd.chaos.observer import CALL_TIMEOUT_S, JobObserver, Sample
from elasticd.chaos.outcomes import judge
from elasticd.chaos.report import BaselineRecord, RunRecord, write_report
from elasticd.chaos.schedule import FaultKind, plan_faults
from elasticd.chaos.targets import (
    ClusterState,
    ClusterView,
    LocalResolver,
    check_agent_kinds,
    check_local_kinds,
    load_state,
    pid_alive,
    targets_of,
)
from elasticd.client import JobClient
from elasticd.coord.etcd import EtcdClient
from elasticd.coord.keys import Keys

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often the schedule loop looks at the clock


@dataclass(frozen=True)
class ChaosOptions:
    spec: str
    out_dir: str
    kinds: tuple[FaultKind, ...]
    seed: int = 0
    duration_s: float = 60.0
    interval_s: float = 15.0
    stop_s: float = 5.0
    baseline: bool = False
    injector: str = "local"  # local: pids from the state file; agent: InjectFault RPCs
    state_path: str = ".elasticd/cluster.json"
    etcd: str = ""  # agent injector: the cluster's etcd
    prefix: str = ""
    warmup_steps: int = 1
    timeout_s: float = 900.0


def _wait(observer: JobObserver, done, timeout_s: float, what: str) -> Sample:
    deadline = time.monotonic() + timeout_s
    while True:
        s = observer.latest()
        if s is not None and done(s):
            return s
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what} (last: {s})")
        time.sleep(TICK_S)


class ChaosRun:
    def __init__(self, opts: ChaosOptions) -> None:
        self.opts = opts
        self.state: ClusterState | None = None
        if opts.injector == "local":
            self.state = load_state(opts.state_path)
            check_local_kinds(opts.kinds, self.state)
            etcd, prefix = self.state.etcd, self.state.prefix
        else:
            check_agent_kinds(opts.kinds)
            etcd, prefix = opts.etcd, opts.prefix
        if not etcd:
            raise ValueError("no etcd endpoints to reach the cluster")
        self.etcd_client = EtcdClient(etcd, timeout=CALL_TIMEOUT_S)
        self.view = ClusterView(self.etcd_client, Keys(prefix))
        self.jobs = JobClient(etcd=etcd, prefix=prefix)
        self.injections: list[Injection] = []
        self.notes: list[str] = []

    def close(self) -> None:
        self.jobs.close()
        self.etcd_client.close()

    def _submit(self) -> tuple[str, float, JobObserver]:
        job_id = self.jobs.submit_file(self.opts.spec)
        submitted = time.monotonic()
        log.info("event=chaos_job_submitted job=%s spec=%s", job_id, self.opts.spec)
        return job_id, submitted, JobObserver(self.view, job_id).start()

    def run_baseline(self) -> BaselineRecord:
        job_id, submitted, observer = self._submit()
        try:
            _wait(observer, lambda s: s.terminal, self.opts.timeout_s, f"baseline job {job_id}")
        finally:
            observer.stop()
        log.info("event=chaos_baseline_done job=%s", job_id)
        return BaselineRecord(job_id, submitted, observer.snapshot())

    def _injector(self, job_id: str) -> Injector:
        if self.state is not None:
            return LocalInjector(LocalResolver(self.state, self.view, job_id))
        return AgentInjector(self.view, job_id)

    def _agents(self) -> list[str]:
        if self.state is not None:
            return [d.name for d in self.state.of_role("agent") if pid_alive(d.pid)]
        return sorted(self.view.nodes())

    def run(self) -> dict:
        baseline = self.run_baseline() if self.opts.baseline else None
        job_id, submitted, observer = self._submit()
        injector = self._injector(job_id)
        started, ended_early = submitted, ""
        try:
            first = _wait(
                observer,
                lambda s: s.terminal or (s.state == "RUNNING" and s.step >= self.opts.warmup_steps),
                self.opts.timeout_s,
                f"job {job_id} to pass step {self.opts.warmup_steps}",
            )
            started = time.monotonic()
            targets = targets_of(
                self.opts.kinds, [w.worker_id for w in first.workers], self._agents(), self.state
            )
            faults = plan_faults(
                self.opts.seed,
                self.opts.duration_s,
                self.opts.interval_s,
                self.opts.kinds,
                targets,
                self.opts.stop_s,
            )
            log.info(
                "event=chaos_started job=%s faults=%d seed=%d", job_id, len(faults), self.opts.seed
            )
            self._inject_all(faults, started, observer, injector)
            resume_all(injector, self.injections)
            final = _wait(
                observer, lambda s: s.terminal, self.opts.timeout_s, f"job {job_id} to end"
            )
            log.info(
                "event=chaos_job_ended job=%s state=%s step=%d", job_id, final.state, final.step
            )
        except (TimeoutError, KeyboardInterrupt) as exc:
            ended_early = str(exc) or "interrupted"  # reported below, with what was seen
        except BaseException:
            resume_all(injector, self.injections)
            self._cancel(job_id)
            raise
        finally:
            resume_all(injector, self.injections)
            observer.stop()
        if ended_early:
            log.warning("event=chaos_ended_early job=%s reason=%s", job_id, ended_early)
            self.notes.append(f"the run ended before the job did ({ended_early}); job cancelled")
            self._cancel(job_id)
        samples = observer.snapshot()
        record = RunRecord(
            job_id=job_id,
            spec=self.opts.spec,
            seed=self.opts.seed,
            injector=self.opts.injector,
            submitted=submitted,
            chaos_started=started,
            samples=samples,
            injections=self.injections,
            outcomes=[judge(i.at, samples) for i in self.injections],
            baseline=baseline,
            notes=self.notes,
        )
        return write_report(record, self.opts.out_dir)

    def _inject_all(
        self, faults, started: float, observer: JobObserver, injector: Injector
    ) -> None:
        """Each fault when due; each stop resumed ``stop_s`` later; stop when the job ends."""
        pending = list(faults)
        while pending or any(i.stopped for i in self.injections):
            now = time.monotonic()
            for inj in self.injections:
                if inj.stopped and now >= inj.at + inj.fault.stop_s:
                    injector.resume(inj)
                    log.info("event=chaos_resumed index=%d pid=%d", inj.fault.index, inj.pid)
            latest = observer.latest()
            if pending and latest is not None and latest.terminal:
                self.notes.append(
                    f"{len(pending)} scheduled fault(s) not injected: the job had ended"
                )
                pending = []
            if pending and now >= started + pending[0].at_s:
                fault = pending.pop(0)
                inj = injector.inject(fault)
                self.injections.append(inj)
                log.info(
                    "event=chaos_fault index=%d what=%s target=%s pid=%d skipped=%s",
                    fault.index,
                    fault.kind,
                    fault.target,
                    inj.pid,
                    inj.skipped or "-",
                )
            time.sleep(TICK_S)

    def _cancel(self, job_id: str) -> None:
        try:
            self.jobs.cancel(job_id)
        except Exception as exc:  # the run failed already; say so, do not hide it
            log.warning("event=chaos_cancel_failed job=%s error=%s", job_id, exc)


def run_chaos(opts: ChaosOptions) -> dict:
    """Run it and write the report directory; returns report.json's content."""
    run = ChaosRun(opts)
    try:
        return run.run()
    finally:
        run.close()
