"""Tiny test task: linear regression ``y = X w* + b* + noise``.

The true weights ``w*`` and bias ``b*`` come from the seed, inputs are standard
normal and the noise has standard deviation ``noise`` (0.01 by default), so an
``nn.Linear(in_features, 1)`` trained with SGD at lr 0.1 drives the MSE loss
down by orders of magnitude within a hundred steps. Every step is microseconds,
which makes it the task of choice for tests of the training machinery.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.nn import functional as F


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``parts``."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class LinRegTask:
    def __init__(self, batch_size: int, seed: int, in_features: int, noise: float) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.in_features = in_features
        self.noise = noise
        gen = seeded_generator("linreg-truth", seed)
        self.w_true = torch.randn(in_features, 1, generator=gen)
        self.b_true = torch.randn(1, generator=gen)

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return nn.Linear(self.in_features, 1)

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        gen = seeded_generator("linreg-batch", self.seed, index)
        x = torch.randn(self.batch_size, self.in_features, generator=gen)
        eps = torch.randn(self.batch_size, 1, generator=gen)
        return x, x @ self.w_true + self.b_true + self.noise * eps

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)


def make_task(batch_size: int, seed: int, in_features: int = 8, noise: float = 0.01) -> LinRegTask:
    return LinRegTask(batch_size, seed, in_features, noise)
