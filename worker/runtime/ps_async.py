"""Asynchronous parameter-server training: pull, compute a gradient, push.

The PS tier applies the optimizer; a worker holds only a replica of the
parameters, refreshed by every pull. The PS counts applied updates (its
version) and stops applying at ``steps``, so the job trains exactly that many
updates however many workers race for the last one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque

import torch

from elasticd.jobspec import JobSpec, parse_spec
from elasticd.placement import ShardPlacement
from elasticd.ps_client import Fenced, PSTier, StaleGradient
from elasticd.task import load_task
from elasticd.worker.runtime import heartbeat
from elasticd.worker.runtime.control import Assignment, ControlChannel
from elasticd.worker.runtime.handover import Handover
from elasticd.worker.runtime.progress import ProgressReporter
from elasticd.worker.runtime.switching import Switch, from_ps, into_ps

log = logging.getLogger(__name__)

FENCED_WAIT_S = 60.0  # how long a fenced worker waits for its new assignment


def _await_assignment(control: ControlChannel, timeout: float) -> Assignment | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not control.closed.is_set():
        heartbeat.beat()
        new = control.poll()
        if new is not None:
            return new
        time.sleep(0.05)
    return None


def _switch_out(tier: PSTier, placement: ShardPlacement, new: Assignment) -> Switch:
    """A switch: every worker takes the PS tier's state along, in the new generation."""
    tier.generation = new.generation
    state = from_ps(tier, placement)
    log.info(
        "event=switched_out job=%s generation=%d worker=%s step=%d digest=%s",
        new.job_id,
        new.generation,
        new.worker_id,
        state.step,
        state.digest(),
    )
    return Switch(new, state)


def train(
    first: Assignment, control: ControlChannel, handover: Handover | None = None
) -> int | Switch:
    a = first
    spec: JobSpec = parse_spec(a.spec)
    task = load_task(spec.task, spec.batch_size, spec.seed, spec.task_args)
    model = task.build_model()
    params = dict(model.named_parameters())
    data = {n: p.detach() for n, p in params.items()}
    placement = ShardPlacement.from_json(json.dumps(a.placement))
    tier = PSTier(a.job_id, a.generation, placement, a.ps, worker_id=a.worker_id)
    reporter = ProgressReporter(a.controller, a.job_id, a.worker_id, a.rank)
    created = tier.init(
        data,
        spec.optimizer.name,
        spec.optimizer.kwargs,
        spec.ps.max_staleness,
        workers=a.world_size,
        max_version=spec.steps,
    )
    log.info("event=shards_ready job=%s worker=%s created=%s", a.job_id, a.worker_id, created)
    if handover is not None:
        # Switched from allreduce: the replica becomes the shards' state.
        sent, held = into_ps(tier, a, spec, handover)
        if a.rank == 0:
            log.info(
                "event=switched_in job=%s generation=%d worker=%s step=%d digest=%s sent=%s",
                a.job_id,
                a.generation,
                a.worker_id,
                handover.step,
                held,
                sent,
            )

    losses: deque[float] = deque(maxlen=spec.report_every_steps)
    # batch indices: this worker takes start + rank, start + rank + world, ...
    index = (handover.position if handover else 0) + a.rank
    local_steps = 0
    step = 0
    try:
        while True:
            heartbeat.beat()
            new = control.poll()
            if new is not None and new.spec["mode"] != "ps-async":
                return _switch_out(tier, placement, new)
            if new is not None:
                a = new
                tier.generation = a.generation
                reporter.retarget(a.controller)
                index = a.rank + a.world_size * (index // max(a.world_size, 1) + 1)
                log.info(
                    "event=generation_adopted job=%s generation=%d rank=%d world=%d",
                    a.job_id,
                    a.generation,
                    a.rank,
                    a.world_size,
                )
            try:
                versions = tier.pull_into(data)
                step = min(versions.values())
                if step >= spec.steps:
                    break
                batch = task.batch(index)
                index += a.world_size
                model.zero_grad(set_to_none=False)
                loss = task.loss(model, batch)
                loss.backward()
                grads = {
                    n: p.grad if p.grad is not None else torch.zeros_like(p)
                    for n, p in params.items()
                }
                outcomes = tier.push(grads, versions, spec.ps.compression)
            except StaleGradient as exc:
                log.info("event=push_stale job=%s worker=%s detail=%s", a.job_id, a.worker_id, exc)
                continue
            except Fenced as exc:
                log.warning(
                    "event=fenced job=%s worker=%s generation=%d detail=%s",
                    a.job_id,
                    a.worker_id,
                    a.generation,
                    exc,
                )
                new = _await_assignment(control, FENCED_WAIT_S)
                if new is None:
                    return 3
                if new.spec["mode"] != "ps-async":
                    return _switch_out(tier, placement, new)
                a = new
                tier.generation = a.generation
                reporter.retarget(a.controller)
                continue
            local_steps += 1
            losses.append(loss.item())
            step = min(o.version for o in outcomes.values())
            if local_steps == 1 or local_steps % spec.report_every_steps == 0:
                mean = sum(losses) / len(losses)
                log.info(
                    "event=step job=%s generation=%d worker=%s step=%d loss=%.4f",
                    a.job_id,
                    a.generation,
                    a.worker_id,
                    step,
                    mean,
                )
                if reporter.report(a.generation, step, mean):
                    break
            if step >= spec.steps or not all(o.applied for o in outcomes.values()):
                break
        mean = sum(losses) / len(losses) if losses else math.nan
        reporter.report(a.generation, max(step, 0), mean, finished=True)
        log.info(
            "event=worker_done job=%s worker=%s step=%d local_steps=%d loss=%.4f",
            a.job_id,
            a.worker_id,
            step,
            local_steps,
            mean,
        )
        return 0
    finally:
        tier.close()
        reporter.close()
