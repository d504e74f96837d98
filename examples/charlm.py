"""Reference task: a small byte-level transformer language model.

The model reads ``context`` bytes (vocabulary 256) and predicts each next byte:
token embedding plus a learned positional embedding, ``n_layers`` pre-LayerNorm
``nn.TransformerEncoderLayer`` blocks under a causal mask, a final LayerNorm
and a linear head. The defaults (context 64, d_model 128, 2 layers, 4 heads)
keep one step cheap enough for a 2-core CPU. Dropout is 0, so the loss of a
given model on a given batch is deterministic.

The corpus needs no download. By default it is the Python standard library's
own ``.py`` sources on this machine, walked in sorted order (skipping
``site-packages``, test directories and unreadable files) until
``corpus_bytes`` bytes are read; pass ``corpus="path/to/file.txt"`` to train
on a text file instead. The stdlib corpus depends on the Python build, so
every process of one job must run the same Python for batches to agree. The
corpus is loaded on first use and cached per process.

``batch(index)`` draws ``batch_size`` random offsets from a generator seeded by
(seed, index) and returns ``(x, y)`` int64 tensors of shape
``[batch_size, context]``, ``y`` being ``x`` shifted by one byte.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

_corpus_cache: dict[tuple[str | None, int], torch.Tensor] = {}


def stdlib_sources(limit: int) -> bytes:
    """Up to ``limit`` bytes of the standard library's ``.py`` files, in sorted walk order."""
    root = sysconfig.get_paths()["stdlib"]
    chunks: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                data = Path(dirpath, name).read_bytes()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= limit:
                return b"".join(chunks)[:limit]
    return b"".join(chunks)


def load_corpus(corpus: str | None, corpus_bytes: int) -> torch.Tensor:
    """The corpus as a uint8 tensor, read once per process and argument pair."""
    key = (corpus, corpus_bytes)
    if key not in _corpus_cache:
        data = Path(corpus).read_bytes()[:corpus_bytes] if corpus else stdlib_sources(corpus_bytes)
        _corpus_cache[key] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _corpus_cache[key]


class CharLM(nn.Module):
    def __init__(self, context: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                n_heads,
                dim_feedforward=4 * d_model,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class CharLMTask:
    def __init__(
        self,
        batch_size: int,
        seed: int,
        context: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        corpus: str | None,
        corpus_bytes: int,
    ) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.context = context
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.corpus = corpus
        self.corpus_bytes = corpus_bytes

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return CharLM(self.context, self.d_model, self.n_layers, self.n_heads)

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        data = load_corpus(self.corpus, self.corpus_bytes)
        if len(data) <= self.context + 1:
            raise ValueError(f"corpus has {len(data)} bytes, need more than {self.context + 1}")
        digest = hashlib.sha256(f"charlm:{self.seed}:{index}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        starts = torch.randint(0, len(data) - self.context, (self.batch_size,), generator=gen)
        rows = data[starts[:, None] + torch.arange(self.context + 1)].long()
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def make_task(
    batch_size: int,
    seed: int,
    context: int = 64,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    corpus: str | None = None,
    corpus_bytes: int = 2_000_000,
) -> CharLMTask:
    return CharLMTask(batch_size, seed, context, d_model, n_layers, n_heads, corpus, corpus_bytes)
