"""context_attention (Triton, paged, packed varlen) against its PyTorch reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.context_attention import context_attention  # noqa: E402
from rtllm.kernels.paged_attention_ref import context_attention_ref  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Ragged batch: a fresh prompt, a one-token chunk after a prefix, a chunk crossing
# several blocks after a prefix, and a short chunk after a long cached prefix.
QUERY_LENS = [5, 1, 20, 3]
CONTEXT_LENS = [0, 17, 9, 40]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


@pytest.mark.parametrize(
    ("tokens_per_block", "group", "head_dim", "window", "dtype"),
    [
        (16, 1, 64, None, torch.float32),
        (32, 4, 128, None, torch.float16),
        (64, 8, 64, None, torch.float32),
        (16, 4, 64, 7, torch.float32),
        (32, 1, 128, 12, torch.float16),
        (16, 2, 80, None, torch.float32),  # head_dim not a power of two
    ],
)
def test_matches_reference(
    paged_batch: Callable,
    device: torch.device,
    tokens_per_block: int,
    group: int,
    head_dim: int,
    window: int | None,
    dtype: torch.dtype,
) -> None:
    num_kv_heads = 2 if group < 8 else 1
    b = paged_batch(
        QUERY_LENS,
        CONTEXT_LENS,
        num_kv_heads * group,
        num_kv_heads,
        head_dim,
        tokens_per_block,
        dtype,
        device,
    )
    scale = head_dim**-0.5
    args = (b.query, b.kv_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, b.max_query_len)
    expected = context_attention_ref(*args, scale, window)
    # 16x16 tiles: several query blocks and key tiles per sequence even at these sizes.
    out = context_attention(*args, scale, window, block_m=16, block_n=16)
    assert out.dtype == dtype and out.shape == b.query.shape
    torch.testing.assert_close(out, expected, **_tolerance(dtype))


def test_strided_query_default_tiles_and_out_buffer(
    paged_batch: Callable, device: torch.device
) -> None:
    heads, kv_heads, head_dim = 4, 2, 32
    b = paged_batch([9, 2], [0, 30], heads, kv_heads, head_dim, 16, torch.float32, device)
    # The query as a view into a fused QKV buffer (token stride (H + 2 Hkv) * D).
    fused = torch.randn(b.query.shape[0], (heads + 2 * kv_heads) * head_dim, device=device)
    fused[:, : heads * head_dim] = b.query.flatten(1)
    query = fused[:, : heads * head_dim].view(-1, heads, head_dim)
    assert not query.is_contiguous()
    args = (b.kv_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, b.max_query_len, 0.3)
    expected = context_attention_ref(b.query, *args)
    out = torch.full_like(b.query, float("nan"))
    result = context_attention(query, *args, out=out)
    assert result is out
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_window_larger_than_sequence_is_plain_causal(
    paged_batch: Callable, device: torch.device
) -> None:
    b = paged_batch([6, 4], [3, 0], 2, 2, 32, 16, torch.float32, device)
    args = (b.query, b.kv_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, b.max_query_len, 0.2)
    torch.testing.assert_close(
        context_attention(*args, 1000, block_m=16, block_n=16),
        context_attention_ref(*args, None),
        rtol=1e-4,
        atol=1e-4,
    )


def test_bad_inputs(paged_batch: Callable, device: torch.device) -> None:
    b = paged_batch([3], [0], 4, 2, 32, 16, torch.float32, device)
    tail = (b.seq_lens, b.block_tables, b.max_query_len, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        context_attention(b.query.half(), b.kv_cache, b.cu_seqlens_q, *tail)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        context_attention(b.query, b.kv_cache, b.cu_seqlens_q.long(), *tail)
    with pytest.raises(ValueError, match="multiple"):
        context_attention(b.query[:, :3], b.kv_cache, b.cu_seqlens_q, *tail)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("tokens_per_block", "group", "head_dim", "window"),
    [(16, 1, 128, None), (32, 4, 128, None), (64, 8, 64, None), (32, 4, 128, 256)],
)
def test_gpu_large(
    paged_batch: Callable,
    dtype: torch.dtype,
    tokens_per_block: int,
    group: int,
    head_dim: int,
    window: int | None,
) -> None:
    query_lens = [1024, 1, 333, 77, 512]
    context_lens = [0, 2047, 1500, 4000, 129]
    kv_heads = 2
    b = paged_batch(
        query_lens,
        context_lens,
        kv_heads * group,
        kv_heads,
        head_dim,
        tokens_per_block,
        dtype,
        "cuda",
    )
    args = (b.query, b.kv_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, b.max_query_len)
    scale = head_dim**-0.5
    expected = context_attention_ref(*args, scale, window)
    out = context_attention(*args, scale, window)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
