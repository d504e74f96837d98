"""The controller: admits jobs, seals membership generations, orders checkpoints.

State lives in etcd; this object holds caches of it and the training progress
that workers report over gRPC (kept in memory: progress is per step, and etcd
carries control, never per-step data). Only the leader acts; a standby keeps
its caches warm and takes over with nothing to reload but what etcd holds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import replace

import torch

from elasticd.checkpoint import (
    CheckpointManifest,
)
from elasticd.coord.etcd import Compare, Delete, EtcdClient, EtcdError, Put
from elasticd.coord.keys import Keys
from elasticd.jobspec import SWITCHABLE, JobSpec
from elasticd.membership import Generation, assign_ranks
from elasticd.placement import ShardPlacement, TensorSpec, place
from elasticd.ps_client import PSTier
from elasticd.server.controller.checkpoints import checkpoint_ps_job
from elasticd.server.controller.planning import (
    ClusterSnapshot,
    Complete,
    Fail,
    JobSnapshot,
    PendingChange,
    Seal,
    Wait,
    decide,
    last_call,
    master_port,
)
from elasticd.server.controller.progress import Progress, ProgressBook
from elasticd.server.controller.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    TERMINAL,
    WAITING,
    JobRecord,
)
from elasticd.server.controller.view import EtcdView, JobNotFound
from elasticd.task import TaskError, load_task
from elasticd.wire import dtype_name

log = logging.getLogger(__name__)

JOIN_WINDOW_S = 1.0  # a changed membership must hold this long before it is sealed
# ...unless changes keep coming for this many join windows: then seal anyway.
JOIN_WINDOW_MAX_FACTOR = 10
RECONCILE_INTERVAL_S = 0.5  # reconcile at least this often, and on every change


class NotLeader(RuntimeError):
    pass


class SwitchRefused(ValueError):
    """A mode switch that cannot happen now; the message says why."""


def tensor_specs(spec: JobSpec) -> list[TensorSpec]:
    """The job's parameters, built on the meta device: shapes without memory.

    Raises TaskError when the task cannot be imported or built with its arguments.
    """
    try:
        task = load_task(spec.task, spec.batch_size, spec.seed, spec.task_args)
        with torch.device("meta"):
            model = task.build_model()
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(
            f"task {spec.task!r} cannot be built with task_args {spec.task_args}: {exc}"
        ) from exc
    return [
        TensorSpec(name, dtype_name(p.dtype), tuple(p.shape))
        for name, p in model.named_parameters()
    ]


class Controller:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        address: str,
        checkpoint_url: str,
        join_window_s: float = JOIN_WINDOW_S,
    ) -> None:
        self.client = client
        self.keys = keys
        self.address = address
        self.checkpoint_url = checkpoint_url
        self.join_window_s = join_window_s
        self._wake = threading.Event()
        self.view = EtcdView(client, keys, self._wake.set)
        self.progress = ProgressBook()
        self._lock = threading.Lock()
        self._pending: dict[str, PendingChange] = {}
        self._busy: set[str] = set()
        self._is_leader = False
        self._adopted: set[str] = set()

    def start(self) -> Controller:
        self.view.start()
        return self

    def stop(self) -> None:
        self.view.stop()

    def job_ids(self) -> list[str]:
        return self.view.job_ids()

    def snapshot(self, job_id: str) -> JobSnapshot:
        return self.view.snapshot(job_id)

    def status(self, job_id: str) -> tuple[JobRecord, Generation | None, dict[str, Progress]]:
        snap = self.snapshot(job_id)
        return self.progress.live(snap.record), snap.generation, self.progress.of(job_id)

    # -- user requests --------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        self._require_leader()
        if spec.mode != "script":
            tensor_specs(spec)  # a task that cannot be built is refused now, not at placement
        job_id = f"{spec.name}-{uuid.uuid4().hex[:6]}"
        now = time.time()
        record = JobRecord(
            job_id=job_id,
            name=spec.name,
            mode=spec.mode,
            state=PENDING,
            total_steps=spec.steps,
            submitted_at=now,
            updated_at=now,
        )
        # _write waits for our cache: the submitter may ask for the job right away.
        ok, _ = self._write(
            compare=[Compare(self.keys.job_spec(job_id), "version", "==", 0)],
            ops=[
                Put(self.keys.job_spec(job_id), spec.to_json().encode()),
                Put(self.keys.job_status(job_id), record.to_json()),
            ],
        )
        if not ok:
            raise RuntimeError(f"job id {job_id} already taken; submit again")
        log.info("event=job_submitted job=%s mode=%s steps=%d", job_id, spec.mode, spec.steps)
        self._wake.set()
        return job_id

    def cancel(self, job_id: str) -> JobRecord:
        self._require_leader()
        snap = self.snapshot(job_id)
        if snap.record.state in TERMINAL:
            return snap.record
        self._finish(snap, snap.record.evolve(state=CANCELLED, message="cancelled by user"))
        return self.snapshot(job_id).record

    def report(
        self, job_id: str, worker: str, generation: int, step: int, loss: float, finished: bool
    ) -> bool:
        """Record a worker's progress; True tells the worker its job is over."""
        if self.progress.record(job_id, worker, generation, step, loss, finished):
            log.info(
                "event=first_loss job=%s worker=%s step=%d loss=%.4f", job_id, worker, step, loss
            )
        try:
            snap = self.snapshot(job_id)
        except JobNotFound:
            return True
        every = snap.spec.checkpoint.every_steps
        rec = snap.record
        if (
            every
            and rec.mode == "ps-async"
            and step - rec.checkpoint_step >= every
            and self._is_leader
        ):
            self._in_background(job_id, lambda: self._checkpoint(job_id))
        schedule = snap.spec.switch
        if rec.switches_done < len(schedule) and step >= schedule[rec.switches_done].at_step:
            if self._is_leader and rec.state == RUNNING:
                due = schedule[rec.switches_done]
                self._in_background(
                    job_id,
                    lambda: self.switch(job_id, due.mode, f"scheduled at step {due.at_step}", True),
                )
        return rec.state in TERMINAL

    def switch(
        self, job_id: str, mode: str, reason: str = "", scheduled: bool = False
    ) -> JobRecord:
        """Move a running job to ``mode`` at its next step boundary.

        A new generation with the same workers carries the new mode; the
        workers hand parameters and optimizer state over between the PS tier
        and their replicas as they adopt it.
        """
        self._require_leader()
        snap = self.snapshot(job_id)
        rec = snap.record
        if mode not in SWITCHABLE or rec.mode not in SWITCHABLE:
            raise SwitchRefused(
                f"only {' and '.join(SWITCHABLE)} jobs switch between those modes "
                f"(job {job_id} is {rec.mode}, asked for {mode!r})"
            )
        if rec.state != RUNNING or snap.generation is None or not snap.generation.members:
            raise SwitchRefused(f"job {job_id} is {rec.state}; only a running job switches modes")
        done = rec.switches_done + (1 if scheduled else 0)
        if mode == rec.mode:
            if scheduled:
                self._put_record(rec.evolve(switches_done=done))
            return rec
        cluster = self.view.cluster()
        if mode == "ps-async" and not cluster.ps:
            raise SwitchRefused("no parameter server is registered to switch to ps-async")
        moved = replace(snap, record=rec.evolve(mode=mode, switches_done=done))
        self._seal(
            moved,
            cluster,
            Seal(tuple(sorted(snap.generation.worker_ids)), reason or f"switch to {mode}"),
        )
        log.info("event=mode_switch job=%s from=%s to=%s", job_id, rec.mode, mode)
        return self.snapshot(job_id).record

    # -- leadership and the reconcile loop ------------------------------------

    def _require_leader(self) -> None:
        if not self._is_leader:
            raise NotLeader("this controller is a standby; ask the leader")

    def set_leader(self, leader: bool) -> None:
        if leader and not self._is_leader:
            log.info("event=leadership_acquired address=%s", self.address)
            self._adopted.clear()
        if not leader and self._is_leader:
            log.warning("event=leadership_lost address=%s", self.address)
        self._is_leader = leader

    def wait(self, timeout: float = RECONCILE_INTERVAL_S) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def reconcile(self) -> None:
        """One pass over every job. Called by the leader only."""
        cluster = self.view.cluster()
        for job_id in self.job_ids():
            if job_id in self._busy:
                continue
            try:
                snap = self.snapshot(job_id)
                if snap.record.state in TERMINAL:
                    continue
                if job_id not in self._adopted and snap.generation is not None:
                    self._adopt(snap, cluster)
                self._act(snap, cluster)
            except JobNotFound:
                continue
            except EtcdError as exc:
                log.warning("event=reconcile_failed job=%s error=%s", job_id, exc)
            except Exception as exc:
                # One job's broken task must not stop the controller for the others.
                log.exception("event=job_error job=%s", job_id)
                try:
                    snap = self.snapshot(job_id)
                    self._finish(
                        snap, snap.record.evolve(state=FAILED, message=f"controller error: {exc}")
                    )
                except Exception:
                    log.exception("event=job_fail_failed job=%s", job_id)

    def _act(self, snap: JobSnapshot, cluster: ClusterSnapshot) -> None:
        job_id = snap.record.job_id
        action = decide(snap, cluster)
        if isinstance(action, Seal):
            pending, wait = last_call(
                self._pending.get(job_id),
                action.workers,
                time.monotonic(),
                self.join_window_s,
                self.join_window_s * JOIN_WINDOW_MAX_FACTOR,
            )
            self._pending[job_id] = pending
            if wait > 0:
                self._wake_later(wait)
                return
            self._pending.pop(job_id, None)
            self._seal(snap, cluster, action)
        else:
            self._pending.pop(job_id, None)
        if isinstance(action, Complete):
            self._in_background(job_id, lambda: self._complete(job_id))
        elif isinstance(action, Fail):
            live = self.progress.live(snap.record)
            self._finish(snap, live.evolve(state=FAILED, message=action.message))
        elif isinstance(action, Wait) and (
            snap.record.state != WAITING or snap.record.message != action.message
        ):
            self._put_record(snap.record.evolve(state=WAITING, message=action.message))

    def _wake_later(self, delay: float) -> None:
        timer = threading.Timer(max(delay, 0.01), self._wake.set)
        timer.daemon = True
        timer.start()

    def _in_background(self, job_id: str, fn) -> None:
        with self._lock:
            if job_id in self._busy:
                return
            self._busy.add(job_id)

        def run():
            try:
                fn()
            except Exception:
                log.exception("event=job_task_failed job=%s", job_id)
            finally:
                with self._lock:
                    self._busy.discard(job_id)
                self._wake.set()

        threading.Thread(target=run, name=f"job-{job_id}", daemon=True).start()

    # -- effects ----------------------------------------------------------------

    def _write(
        self, ops: list[Put | Delete], compare: list[Compare] | None = None
    ) -> tuple[bool, int]:
        """Run a transaction, then wait until our own cache has seen it (read your writes)."""
        ok, revision = self.client.transaction(compare or [], ops)
        if ok:
            self.view.wait_for_revision(revision)
        return ok, revision

    def _put_record(self, record: JobRecord) -> None:
        status = record.evolve(updated_at=time.time()).to_json()
        self._write([Put(self.keys.job_status(record.job_id), status)])

    def _placement(self, snap: JobSnapshot, cluster: ClusterSnapshot) -> ShardPlacement | None:
        if snap.record.mode != "ps-async":
            return self.view.placement(snap.record.job_id)  # kept for a switch back
        existing = self.view.placement(snap.record.job_id)
        if existing is not None:
            return existing
        placement = place(tensor_specs(snap.spec), sorted(cluster.ps))
        self.client.put(self.keys.placement(snap.record.job_id), placement.to_json().encode())
        log.info(
            "event=placed job=%s slices=%d bytes_per_ps=%s",
            snap.record.job_id,
            len(placement.slices),
            placement.bytes_per_ps(),
        )
        return placement

    def assignment(
        self,
        snap: JobSnapshot,
        gen: Generation,
        placement: ShardPlacement | None,
        cluster: ClusterSnapshot,
        node_id: str,
    ) -> bytes:
        rank0 = gen.members[0].node_id if gen.members else node_id
        node = cluster.nodes.get(rank0)
        return json.dumps(
            {
                "job_id": snap.record.job_id,
                "generation": gen.number,
                "world_size": gen.world_size,
                "members": [m.__dict__ for m in gen.on_node(node_id)],
                "all_members": [m.__dict__ for m in gen.members],
                "master_addr": (node.address or node.hostname) if node else "",
                "master_port": master_port(snap.spec, snap.record.job_id, gen.number),
                "spec": {**snap.spec.to_dict(), "mode": snap.record.mode},
                "placement": json.loads(placement.to_json()) if placement else None,
                "ps": {p: cluster.ps[p] for p in placement.ps_ids} if placement else {},
                "controller": self.address,
            }
        ).encode()

    def _seal(self, snap: JobSnapshot, cluster: ClusterSnapshot, action: Seal) -> None:
        job_id = snap.record.job_id
        gen_key = self.keys.generation(job_id)
        current = self.client.get(gen_key)
        seen = snap.generation.number if snap.generation else 0
        number = Generation.from_json(current.value).number if current else 0
        if number != seen:
            return  # our cache is behind; the next pass sees the new generation
        placement = self._placement(snap, cluster)
        gen = assign_ranks(job_id, number + 1, action.workers)
        state = RUNNING if gen.members else WAITING
        record = snap.record.evolve(
            state=state, generation=gen.number, message=action.reason, updated_at=time.time()
        )
        ops: list[Put | Delete] = [
            Put(gen_key, gen.to_json()),
            Put(self.keys.job_status(job_id), record.to_json()),
        ]
        for node in gen.nodes:
            ops.append(
                Put(
                    self.keys.assignment(node, job_id),
                    self.assignment(snap, gen, placement, cluster, node),
                )
            )
        old_nodes = set(snap.generation.nodes) if snap.generation else set()
        for node in old_nodes - set(gen.nodes):
            ops.append(Delete(self.keys.assignment(node, job_id)))
        compare = [Compare(gen_key, "mod", "==", current.mod_revision if current else 0)]
        ok, revision = self._write(ops, compare)
        if not ok:
            log.info("event=seal_lost job=%s generation=%d", job_id, gen.number)
            return
        self._adopted.add(job_id)
        log.info(
            "event=generation_sealed job=%s generation=%d world=%d revision=%d %s",
            job_id,
            gen.number,
            gen.world_size,
            revision,
            action.reason,
        )
        if placement is not None:
            self._fence_ps(job_id, gen, placement, cluster)

    def _fence_ps(
        self, job_id: str, gen: Generation, placement: ShardPlacement, cluster: ClusterSnapshot
    ) -> None:
        """Tell the PS tier about the new generation so the old one is fenced off."""
        try:
            tier = PSTier(job_id, gen.number, placement, cluster.ps)
        except Exception as exc:
            log.warning("event=fence_skipped job=%s error=%s", job_id, exc)
            return
        try:
            info = tier.info()
            if all(i.exists for i in info.values()):
                tier.advance(max(gen.world_size, 1))
        except Exception as exc:
            log.info("event=fence_deferred job=%s generation=%d error=%s", job_id, gen.number, exc)
        finally:
            tier.close()

    def _adopt(self, snap: JobSnapshot, cluster: ClusterSnapshot) -> None:
        """A new leader points the running generation's workers at itself."""
        gen = snap.generation
        placement = self._placement(snap, cluster) if gen.members else None
        ops = [
            Put(
                self.keys.assignment(node, snap.record.job_id),
                self.assignment(snap, gen, placement, cluster, node),
            )
            for node in gen.nodes
        ]
        ok, _ = self.client.transaction(
            [Compare(self.keys.generation(snap.record.job_id), "value", "==", gen.to_json())], ops
        )
        if ok:
            self._adopted.add(snap.record.job_id)
            log.info("event=job_adopted job=%s generation=%d", snap.record.job_id, gen.number)

    def _checkpoint(self, job_id: str) -> CheckpointManifest | None:
        snap = self.snapshot(job_id)
        placement = self.view.placement(job_id)
        if snap.generation is None or placement is None:
            return None
        live = self.progress.live(snap.record)
        url = snap.spec.checkpoint.url or self.checkpoint_url
        manifest, where = checkpoint_ps_job(
            snap, placement, self.view.cluster().ps, url, extra={"loss": live.loss}
        )
        if manifest is None:
            return None
        fresh = self.snapshot(job_id).record
        self._put_record(
            fresh.evolve(
                checkpoint=where, checkpoint_step=manifest.step, step=max(fresh.step, manifest.step)
            )
        )
        return manifest

    def _complete(self, job_id: str) -> None:
        self._checkpoint(job_id)
        snap = self.snapshot(job_id)
        live = self.progress.live(snap.record)
        self._finish(snap, live.evolve(state=COMPLETED, message="completed"))

    def _finish(self, snap: JobSnapshot, record: JobRecord) -> None:
        """Move a job to a terminal state, withdraw its assignments, free its shards."""
        job_id = record.job_id
        ops: list[Put | Delete] = [
            Put(self.keys.job_status(job_id), record.evolve(updated_at=time.time()).to_json())
        ]
        if snap.generation:
            ops += [Delete(self.keys.assignment(n, job_id)) for n in snap.generation.nodes]
        self._write(ops)
        log.info(
            "event=job_finished job=%s state=%s step=%d loss=%.4f",
            job_id,
            record.state,
            record.step,
            record.loss,
        )
        placement = self.view.placement(job_id)
        if placement is not None and snap.generation:
            tier = PSTier(job_id, snap.generation.number, placement, self.view.cluster().ps)
            try:
                tier.drop()
            except Exception as exc:
                log.info("event=drop_shards_failed job=%s error=%s", job_id, exc)
            finally:
                tier.close()
