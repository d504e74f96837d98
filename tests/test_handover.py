"""Training state moves between PS slices and a replica unchanged to the bit."""

from __future__ import annotations

import pytest
import torch

from elasticd.optimizers import build_optimizer
from elasticd.placement import TensorSpec, place
from elasticd.slicing import join_slices, split_state
from elasticd.wire import dtype_name
from elasticd.worker.runtime.handover import load_named_optimizer_state, named_optimizer_state

OPTIMIZERS = [
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    ("adam", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}),
    ("adagrad", {"lr": 0.1}),
]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.Tanh(), torch.nn.Linear(33, 2))


def train(m, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        loss = m(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_split_then_train_on_slices_then_join_equals_training_the_replica(name, kwargs):
    m = model()
    names = [n for n, _ in m.named_parameters()]
    opt = build_optimizer(name, kwargs, m.parameters())
    train(m, opt, 3, seed=1)
    specs = [TensorSpec(n, dtype_name(p.dtype), tuple(p.shape)) for n, p in m.named_parameters()]
    placement = place(specs, ["ps-0", "ps-1"], min_split_bytes=0)
    assert any(not s.whole for s in placement.slices)  # rows are really split

    parts = split_state(
        placement,
        {n: p.detach() for n, p in m.named_parameters()},
        named_optimizer_state(opt, names),
    )
    # Each "PS" runs torch.optim on its slices, as a shard does.
    shards = {}
    for ps_id, (tensors, state, keys) in parts.items():
        slice_params = [torch.nn.Parameter(tensors[k].clone()) for k in keys]
        slice_opt = build_optimizer(name, kwargs, slice_params)
        groups = slice_opt.state_dict()["param_groups"]
        slice_opt.load_state_dict({"state": state, "param_groups": groups})
        shards[ps_id] = (keys, slice_params, slice_opt)

    # One more step everywhere with the same gradient.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 6, generator=g)
    loss = m(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    by_key = {s.key: s for s in placement.slices}
    for keys, slice_params, slice_opt in shards.values():
        for k, p in zip(keys, slice_params, strict=True):
            s = by_key[k]
            p.grad = grads[s.param] if s.whole else grads[s.param][s.row_start : s.row_end].clone()
        slice_opt.step()

    payloads = {
        ps_id: (
            {k: p.detach() for k, p in zip(keys, ps, strict=True)},
            slice_opt.state_dict(),
            {"keys": keys},
        )
        for ps_id, (keys, ps, slice_opt) in shards.items()
    }
    params, named = join_slices(placement, payloads)
    for n, p in m.named_parameters():
        assert torch.equal(params[n], p.detach()), n
    local = named_optimizer_state(opt, names)
    assert local.keys() == named.keys()
    for n in names:
        for k, v in local[n].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(named[n][k], v), (n, k)
            else:
                assert named[n][k] == v, (n, k)

    # And the joined state loads into a fresh replica optimizer that steps identically.
    fresh = model()
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(params[n])
    fresh_opt = build_optimizer(name, kwargs, fresh.parameters())
    load_named_optimizer_state(fresh_opt, names, named)
    train(m, opt, 2, seed=9)
    train(fresh, fresh_opt, 2, seed=9)
    for (n, a), (_, b) in zip(m.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n
