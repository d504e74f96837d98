"""Checkpoints of allreduce jobs: every rank writes its own slice of the replica.

Every replica holds the whole state, so a checkpoint needs no collective:
at a step every rank knows (``checkpoint.every_steps``, and the last step),
each rank cuts the replica by the rank placement
(:func:`elasticd.placement.rank_placement`: rank ``r`` of ``W`` takes the
slices placed on ``rank-r``), copies its slice in memory (the only pause),
and encodes and writes it in a background thread, in the format a PS writes
its shard in. It then tells the controller, which commits the manifest once
every rank of the generation wrote its slice of that step (invariant 4), with
the same manifest layout as a ps-async checkpoint: either mode restores from
either. A checkpoint asked for while the previous one is still being written
is skipped, with a log line.

A group whose replicas hold no state (a fresh start, or every process of the
job died) takes it from storage (:func:`restore_state`): the job's newest
verified checkpoint, else the one it was submitted to resume from.
"""

from __future__ import annotations

import logging
import threading

import torch

from elasticd.checkpoint import CheckpointStore, encode_shard
from elasticd.checkpoint.locate import NoSuchCheckpoint, load_state, locate
from elasticd.placement import TensorSpec, rank_placement
from elasticd.slicing import split_state
from elasticd.wire import dtype_name
from elasticd.worker.runtime.handover import Handover, named_optimizer_state
from elasticd.worker.runtime.progress import ProgressReporter

log = logging.getLogger(__name__)


def tensor_specs(model: torch.nn.Module) -> list[TensorSpec]:
    return [
        TensorSpec(n, dtype_name(p.dtype), tuple(p.shape))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]


class RankCheckpointer:
    def __init__(
        self,
        job_id: str,
        url: str,
        every_steps: int,
        last_step: int,
        optimizer: str,
        reporter: ProgressReporter | None,
    ) -> None:
        self.job_id, self.url = job_id, url
        self.every_steps, self.last_step = every_steps, last_step
        self.optimizer = optimizer
        self.reporter = reporter
        self._writing: threading.Thread | None = None

    def due(self, step: int) -> bool:
        if not self.url or step <= 0:
            return False
        return step == self.last_step or bool(self.every_steps) and step % self.every_steps == 0

    def take(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        step: int,
        position: int,
        rank: int,
        world: int,
        generation: int,
    ) -> bool:
        """Copy this rank's slice now and write it in the background; False if skipped.

        The last step's checkpoint waits for the one before it rather than being skipped.
        A job without a checkpoint store takes none.
        """
        if not self.url:
            return False
        if step == self.last_step:
            self.wait()
        if self._writing is not None and self._writing.is_alive():
            log.info(
                "event=checkpoint_skipped job=%s step=%d reason=the previous one is still "
                "being written",
                self.job_id,
                step,
            )
            return False
        specs = tensor_specs(model)
        names = [s.name for s in specs]
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        name = f"rank-{rank}"
        placement = rank_placement(specs, world)
        if name not in placement.groups:  # more ranks than slices: nothing of it falls here
            tensors, state, keys = {}, {}, []
        else:
            cut = split_state(placement, params, named_optimizer_state(opt, names), only=name)
            tensors, state, keys = cut[name]  # copies: training goes on while they are written

        def write() -> None:
            data = encode_shard(
                tensors,
                {"state": state, "param_groups": [{"params": list(range(len(keys)))}]},
                {
                    "job_id": self.job_id,
                    "version": step,
                    "generation": generation,
                    "optimizer": self.optimizer,
                    "keys": keys,
                },
            )
            try:
                record = CheckpointStore(self.url).write_shard(self.job_id, step, name, data)
            except Exception as exc:  # storage down: this checkpoint is lost, training is not
                log.warning(
                    "event=checkpoint_write_failed job=%s step=%d shard=%s error=%s: %s",
                    self.job_id,
                    step,
                    name,
                    type(exc).__name__,
                    exc,
                )
                return
            committed = self.reporter is not None and self.reporter.shard_written(
                generation, rank, world, step, position, self.url, record
            )
            log.info(
                "event=checkpoint_shard_written job=%s step=%d shard=%s bytes=%d committed=%s",
                self.job_id,
                step,
                name,
                record.size,
                committed,
            )

        self._writing = threading.Thread(target=write, name="checkpoint", daemon=True)
        self._writing.start()
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Let the checkpoint under way finish (before the process exits)."""
        if self._writing is not None:
            self._writing.join(timeout)


def restore_state(job_id: str, url: str, resume_from: str) -> Handover | None:
    """The state a group without any takes: the job's newest verified checkpoint, else the
    one it was submitted to resume from, else None (a fresh start)."""
    if not url:
        return None
    store = CheckpointStore(url)
    manifest = store.latest(job_id)
    if manifest is None and resume_from:
        try:
            store, manifest = locate(resume_from, url)
        except NoSuchCheckpoint as exc:
            raise RuntimeError(f"job {job_id} cannot resume from {resume_from}: {exc}") from exc
    if manifest is None:
        return None
    params, named = load_state(store, manifest)
    position = int(manifest.extra.get("position", manifest.step))
    log.info(
        "event=restored_from_checkpoint job=%s step=%d position=%d checkpoint=%s",
        job_id,
        manifest.step,
        position,
        store.url_of(manifest),
    )
    return Handover(params, named, manifest.step, position)
