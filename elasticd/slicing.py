"""Cutting a job's training state into the slices its PS tier holds, and joining it again.

A ps-async job keeps its parameters and torch.optim state on the PS tier, cut
into slices (whole tensors or row ranges, see :mod:`elasticd.placement`):

* :func:`join_slices` puts a parameter's slices and their optimizer state back
  together, keyed by parameter name (from a PS export or a checkpoint's shards);
* :func:`split_state` cuts whole state into the slices each group of a
  placement holds (for a switch into ps-async, or a restore onto another placement).

The optimizers elasticd allows keep per-element state (SGD momentum, Adam's
moments, Adagrad's sums) shaped like the parameter, plus scalars (``step``)
that are equal across a parameter's slices, since every slice of a parameter
is updated on every step. So slicing and joining by rows is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from elasticd.placement import ShardPlacement, Slice

# name -> {"exp_avg": tensor, "step": tensor or number, ...}
NamedState = dict[str, dict[str, Any]]


def _is_per_row(value: Any, s: Slice) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and tuple(value.shape) == s.shape


def join_slices(
    placement: ShardPlacement,
    payloads: Mapping[str, tuple[dict[str, torch.Tensor], dict, dict]],
) -> tuple[dict[str, torch.Tensor], NamedState]:
    """Whole parameters and their optimizer state from every group's exported shard.

    ``payloads[group]`` is ``(tensors by slice key, optimizer state_dict, meta)``
    as :func:`elasticd.checkpoint.decode_shard` returns it; the optimizer's
    state indices follow the shard's slice order (``meta["keys"]``).
    """
    params: dict[str, list[tuple[int, torch.Tensor]]] = {}
    states: dict[str, list[tuple[Slice, dict[str, Any]]]] = {}
    for group in placement.groups:
        tensors, opt_state, meta = payloads[group]
        keys = meta["keys"]
        by_key = {s.key: s for s in placement.in_group(group)}
        for index, key in enumerate(keys):
            s = by_key[key]
            params.setdefault(s.param, []).append((s.row_start, tensors[key]))
            per_slice = opt_state.get("state", {}).get(
                index, opt_state.get("state", {}).get(str(index))
            )
            if per_slice is not None:
                states.setdefault(s.param, []).append((s, per_slice))
    whole = {
        name: pieces[0][1]
        if len(pieces) == 1
        else torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])])
        for name, pieces in params.items()
    }
    named: NamedState = {}
    for name, pieces in states.items():
        pieces.sort(key=lambda p: p[0].row_start)
        merged: dict[str, Any] = {}
        for key, first in pieces[0][1].items():
            if len(pieces) > 1 and _is_per_row(first, pieces[0][0]):
                merged[key] = torch.cat([st[key] for _, st in pieces])
            else:
                merged[key] = first
        named[name] = merged
    return whole, named


def split_state(
    placement: ShardPlacement,
    params: Mapping[str, torch.Tensor],
    named: NamedState,
    only: str | None = None,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]], list[str]]]:
    """Per group (or group ``only``): (tensors by slice key, optimizer state by slice
    index, slice keys in order). Every tensor is a copy."""
    out = {}
    for group in placement.groups if only is None else [only]:
        tensors: dict[str, torch.Tensor] = {}
        state: dict[int, dict[str, Any]] = {}
        keys = []
        for index, s in enumerate(placement.in_group(group)):
            keys.append(s.key)
            whole = params[s.param]
            tensors[s.key] = (whole if s.whole else whole[s.row_start : s.row_end]).detach().clone()
            if s.param in named:
                per = {}
                for k, v in named[s.param].items():
                    if (
                        not s.whole
                        and isinstance(v, torch.Tensor)
                        and v.dim() >= 1
                        and v.shape == whole.shape
                    ):
                        per[k] = v[s.row_start : s.row_end].clone()
                    else:
                        per[k] = v.clone() if isinstance(v, torch.Tensor) else v
                state[index] = per
        out[group] = (tensors, state, keys)
    return out
