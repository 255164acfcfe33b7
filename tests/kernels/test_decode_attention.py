"""decode_attention (Triton split-K over paged KV) against its PyTorch reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.decode_attention import (  # noqa: E402
    MAX_SPLITS,
    choose_num_splits,
    decode_attention,
    decode_attention_ref,
)
from rtllm.kernels.split_counters import split_counters  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Ragged: a 1-token sequence, exact block multiples, odd lengths.
SEQ_LENS = [1, 17, 64, 100, 33]


def _batch(paged_batch: Callable, seq_lens: list[int], *args: object) -> object:
    """One new token per sequence at position seq_len - 1."""
    return paged_batch([1] * len(seq_lens), [s - 1 for s in seq_lens], *args)


@pytest.mark.parametrize(
    ("tokens_per_block", "group", "head_dim", "window", "dtype"),
    [
        (16, 1, 64, None, torch.float32),
        (32, 4, 128, None, torch.float16),
        (64, 8, 64, None, torch.float32),
        (16, 4, 64, 20, torch.float32),
        (32, 8, 128, 50, torch.float16),
    ],
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference(
    paged_batch: Callable,
    device: torch.device,
    tokens_per_block: int,
    group: int,
    head_dim: int,
    window: int | None,
    dtype: torch.dtype,
    num_splits: int,
) -> None:
    kv_heads = 2 if group < 8 else 1
    b = _batch(
        paged_batch, SEQ_LENS, kv_heads * group, kv_heads, head_dim, tokens_per_block, dtype, device
    )
    scale = head_dim**-0.5
    expected = decode_attention_ref(b.query, b.kv_cache, b.seq_lens, b.block_tables, scale, window)
    out = decode_attention(
        b.query,
        b.kv_cache,
        b.seq_lens,
        b.block_tables,
        scale,
        window,
        num_splits=num_splits,
        block_n=16,
    )
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_more_splits_than_tiles_and_padded_rows(
    paged_batch: Callable, device: torch.device
) -> None:
    """Empty slices weigh nothing; seq_len 0 (a padded CUDA-graph row) gives zeros; the
    last slice to arrive merges in the same launch and resets its counter."""
    b = _batch(paged_batch, [5, 40, 2], 8, 2, 32, 16, torch.float32, device)
    seq_lens = b.seq_lens.clone()
    seq_lens[1] = 0
    expected = decode_attention_ref(b.query, b.kv_cache, seq_lens, b.block_tables, 0.5)
    for splits in (1, 7):
        out = decode_attention(
            b.query, b.kv_cache, seq_lens, b.block_tables, 0.5, num_splits=splits
        )
        assert not out.isnan().any()
        assert not out[1].any()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert int(split_counters(device).abs().sum()) == 0


def test_strided_query_and_default_split_choice(
    paged_batch: Callable, device: torch.device
) -> None:
    b = _batch(paged_batch, [300, 9], 4, 1, 32, 32, torch.float32, device)
    fused = torch.randn(2, 6 * 32, device=device)
    fused[:, : 4 * 32] = b.query.flatten(1)
    query = fused[:, : 4 * 32].view(2, 4, 32)
    expected = decode_attention_ref(b.query, b.kv_cache, b.seq_lens, b.block_tables, 0.2)
    out = decode_attention(query, b.kv_cache, b.seq_lens, b.block_tables, 0.2, max_seq_len=300)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_choose_num_splits() -> None:
    # Big batches already fill the GPU: no split.
    assert choose_num_splits(batch=256, num_kv_heads=8, max_seq_len=32768, num_sms=132) == 1
    assert choose_num_splits(batch=33, num_kv_heads=8, max_seq_len=32768, num_sms=132) == 1
    # Batch 1, long context: about four programs per SM.
    splits = choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=32768, num_sms=132)
    assert splits * 8 >= 4 * 132 and splits <= MAX_SPLITS
    # Short contexts are not split below MIN_TOKENS_PER_SPLIT keys per slice.
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=100, num_sms=132) == 1
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=1024, num_sms=132) == 8
    # CUDA-graph mode (no length bound) and the cap.
    assert choose_num_splits(batch=1, num_kv_heads=1, max_seq_len=None, num_sms=132) == MAX_SPLITS


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("tokens_per_block", "group", "head_dim", "window"),
    [(16, 1, 128, None), (32, 4, 128, None), (64, 8, 64, None), (32, 4, 128, 4096)],
)
@pytest.mark.parametrize("seq_lens", [[32768], [1, 2, 15, 16, 17, 255, 1000, 4097, 32000, 8191]])
def test_gpu_long_contexts(
    paged_batch: Callable,
    dtype: torch.dtype,
    tokens_per_block: int,
    group: int,
    head_dim: int,
    window: int | None,
    seq_lens: list[int],
) -> None:
    kv_heads = 8 // group if group < 8 else 1
    b = _batch(
        paged_batch, seq_lens, kv_heads * group, kv_heads, head_dim, tokens_per_block, dtype, "cuda"
    )
    scale = head_dim**-0.5
    args = (b.query, b.kv_cache, b.seq_lens, b.block_tables, scale, window)
    expected = decode_attention_ref(*args)
    out = decode_attention(*args, max_seq_len=max(seq_lens))
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for splits in (1, 5, MAX_SPLITS):
        torch.testing.assert_close(
            decode_attention(*args, num_splits=splits), expected, rtol=2e-2, atol=2e-2
        )
