"""Kernel test fixtures (the interpreter switch for CPU runs is in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@dataclass
class PagedBatch:
    """A random packed batch over a random paged cache (blocks shuffled)."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]
    seq_lens: torch.Tensor  # int32 [batch]
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    slot_mapping: torch.Tensor  # int32 [num_tokens] slots of the new tokens
    max_query_len: int


def make_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    tokens_per_block: int,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
) -> PagedBatch:
    """Every sequence's keys (cached and new) are already in the cache."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    counts = [max(1, -(-s // tokens_per_block)) for s in seq_lens]
    num_blocks = sum(counts) + 2  # spare blocks hold garbage that must never be read
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in counts:
        tables.append(perm[used : used + n])
        used += n
    width = max(counts)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    slots = [
        tables[i][p // tokens_per_block] * tokens_per_block + p % tokens_per_block
        for i, (q, c) in enumerate(zip(query_lens, context_lens, strict=True))
        for p in range(c, c + q)
    ]
    shape = (2, num_blocks, tokens_per_block, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        query=query.to(device),
        kv_cache=kv_cache.to(device),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
    )


@pytest.fixture
def paged_batch() -> Callable[..., PagedBatch]:
    """Factory fixture: ``paged_batch(query_lens, context_lens, ...)``."""
    return make_paged_batch


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else CPU (kernels then run in Triton's interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
