"""The example tasks honour the task contract and actually learn."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from elasticd.task import Task, load_task

EXAMPLES = Path(__file__).parents[1] / "examples"
CHARLM = str(EXAMPLES / "charlm.py")
LINREG = str(EXAMPLES / "linreg.py")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(
    task: Task, steps: int, make_opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
) -> list[float]:
    model = task.build_model()
    opt = make_opt(list(model.parameters()))
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = task.loss(model, task.batch(i))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("ref", [CHARLM, LINREG])
def test_build_model_is_deterministic(ref: str) -> None:
    a = load_task(ref, batch_size=4, seed=7).build_model().state_dict()
    b = load_task(ref, batch_size=4, seed=7).build_model().state_dict()
    c = load_task(ref, batch_size=4, seed=8).build_model().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("ref", [CHARLM, LINREG])
def test_batch_is_a_pure_function_of_seed_and_index(ref: str) -> None:
    task = load_task(ref, batch_size=4, seed=7)
    first = task.batch(3)
    task.batch(0)  # other draws in between must not matter
    torch.manual_seed(12345)  # nor the global RNG
    again = load_task(ref, batch_size=4, seed=7).batch(3)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    assert not torch.equal(task.batch(4)[0], first[0])
    assert not torch.equal(load_task(ref, batch_size=4, seed=8).batch(3)[0], first[0])


def test_build_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    load_task(CHARLM, batch_size=4, seed=7).build_model()
    assert torch.equal(torch.rand(3), expected)


def test_charlm_batch_shapes() -> None:
    x, y = load_task(CHARLM, batch_size=5, seed=0, args={"context": 16}).batch(0)
    assert x.shape == y.shape == (5, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(x.max()) < 256


def test_charlm_reads_a_corpus_file(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"abcdefgh" * 100)
    x, y = load_task(CHARLM, batch_size=3, seed=0, args={"corpus": str(text), "context": 8}).batch(
        0
    )
    assert set(x.flatten().tolist()) <= set(b"abcdefgh")
    assert torch.equal((x + 1 - ord("a")) % 8, (y - ord("a")) % 8)


def test_charlm_loss_falls() -> None:
    task = load_task(CHARLM, batch_size=8, seed=0)
    losses = train(task, 60, lambda params: torch.optim.Adam(params, lr=3e-3))
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses


def test_linreg_loss_falls() -> None:
    task = load_task(LINREG, batch_size=32, seed=0)
    losses = train(task, 100, lambda params: torch.optim.SGD(params, lr=0.1))
    assert mean(losses[-5:]) < mean(losses[:5]) / 10, losses
