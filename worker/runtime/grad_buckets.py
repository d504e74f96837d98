"""Gradients all-reduced in buckets while backward still runs, as DDP does.

Every parameter's gradient has a slot in one of a few contiguous buffers,
laid out in reverse parameter order, the order in which backward usually
produces gradients. As in DDP, a bucket is closed once it holds 25 MiB, the
first one already at 1 MiB so that communication starts early. A hook on each parameter
(``register_post_accumulate_grad_hook``) copies the fresh gradient into its
slot and points ``p.grad`` at the slot; when every slot of a bucket is
filled, the bucket is all-reduced asynchronously while backward computes the
next gradients. Buckets are launched strictly in index order (a full bucket
waits for the ones before it), so every rank issues the same collectives in
the same order whatever order its hooks fire in.

After backward, what is left is launched (a parameter that got no gradient
this step counts as zeros), all buckets are waited for and divided by the
world size in place. The optimizer then reads the averaged gradient through
``p.grad`` — one copy per gradient in all, none back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from elasticd.worker.runtime.process_group import CollectiveFailed, ElasticGroup

BUCKET_CAP_BYTES = 25 << 20  # DDP's default bucket_cap_mb
FIRST_BUCKET_CAP_BYTES = 1 << 20  # DDP's first bucket: start communicating early


@dataclass
class _Bucket:
    buffer: torch.Tensor
    params: list[torch.nn.Parameter] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)
    pending: int = 0
    work: object | None = None


class GradientBuckets:
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        cap_bytes: int = BUCKET_CAP_BYTES,
        first_cap_bytes: int = FIRST_BUCKET_CAP_BYTES,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        # As DDP does: fill a bucket until it holds at least its cap, then start the next.
        layout: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed(self.params):
            cap = first_cap_bytes if len(layout) == 1 else cap_bytes
            last = layout[-1][-1] if layout else None
            if last is None or (last.dtype, last.device) != (p.dtype, p.device) or size >= cap:
                layout.append([])
                size = 0
            layout[-1].append(p)
            size += p.numel() * p.element_size()
        self.buckets: list[_Bucket] = []
        self._slot: dict[int, tuple[int, torch.Tensor]] = {}
        for index, members in enumerate(layout):
            total = sum(p.numel() for p in members)
            bucket = _Bucket(torch.zeros(total, dtype=members[0].dtype, device=members[0].device))
            offset = 0
            for p in members:
                view = bucket.buffer[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                bucket.params.append(p)
                bucket.views.append(view)
                self._slot[id(p)] = (index, view)
            self.buckets.append(bucket)
        self._group: ElasticGroup | None = None
        self._filled: set[int] = set()
        self._next = 0
        self._error: CollectiveFailed | None = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    @property
    def nbytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    def prepare(self, group: ElasticGroup) -> None:
        """Before backward: clear the gradients and arm the hooks for ``group``."""
        for p in self.params:
            p.grad = None  # autograd then hands over its fresh gradient; the hook copies it once
        for b in self.buckets:
            b.pending = len(b.params)
            b.work = None
        self._filled.clear()
        self._next = 0
        self._error = None
        self._group = group

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if self._group is None or id(p) in self._filled:
            return  # a backward outside a training step
        index, view = self._slot[id(p)]
        grad = p.grad
        view.copy_(grad.to_dense() if grad.is_sparse else grad)
        p.grad = view
        self._filled.add(id(p))
        self.buckets[index].pending -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        assert self._group is not None
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            bucket = self.buckets[self._next]
            self._next += 1
            if self._error is not None:
                continue
            try:
                bucket.work = self._group.all_reduce(bucket.buffer, async_op=True)
            except CollectiveFailed as exc:
                self._error = exc

    def finish(self) -> None:
        """After backward: all-reduce what is left, wait, average. Raises CollectiveFailed."""
        group = self._group
        assert group is not None, "prepare() was not called"
        for p in self.params:
            if id(p) not in self._filled:
                index, view = self._slot[id(p)]
                view.zero_()
                p.grad = view
                self._filled.add(id(p))
                self.buckets[index].pending -= 1
        self._launch_ready()
        self._group = None
        for b in self.buckets:  # wait for every launched bucket, even after a failure
            if b.work is not None:
                try:
                    group.wait(b.work)
                except CollectiveFailed as exc:
                    self._error = self._error or exc
                b.work = None
        if self._error is not None:
            raise self._error
        if group.world_size > 1:
            for b in self.buckets:
                b.buffer.div_(group.world_size)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
