"""write_kv_cache (Triton) against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.kv_cache_write import write_kv_cache, write_kv_cache_ref  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _slots(num_tokens: int, num_slots: int, seed: int) -> torch.Tensor:
    """Distinct random slots (duplicates would make the result order-dependent)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_slots, generator=gen)[:num_tokens]


@pytest.mark.parametrize("tokens_per_block", [16, 32, 64])
@pytest.mark.parametrize(
    ("cache_dtype", "kv_dtype", "slot_dtype"),
    [
        (torch.float32, torch.float32, torch.int64),
        (torch.float16, torch.float16, torch.int32),
        (torch.float16, torch.float32, torch.int32),  # cast on store
    ],
)
def test_matches_reference(
    device: torch.device,
    tokens_per_block: int,
    cache_dtype: torch.dtype,
    kv_dtype: torch.dtype,
    slot_dtype: torch.dtype,
) -> None:
    num_tokens, heads, head_dim, num_blocks = 7, 2, 64, 3
    gen = torch.Generator().manual_seed(tokens_per_block)
    cache = torch.randn(2, num_blocks, tokens_per_block, heads, head_dim, generator=gen)
    cache = cache.to(device, cache_dtype)
    key = torch.randn(num_tokens, heads, head_dim, generator=gen).to(device, kv_dtype)
    value = torch.randn(num_tokens, heads, head_dim, generator=gen).to(device, kv_dtype)
    slots = _slots(num_tokens, num_blocks * tokens_per_block, seed=1).to(device, slot_dtype)
    expected = cache.clone()
    write_kv_cache_ref(key, value, expected, slots)
    write_kv_cache(key, value, cache, slots)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    # The reference really wrote the rows (guards against a no-op on both sides).
    flat = expected[0].reshape(-1, heads, head_dim)
    torch.testing.assert_close(flat[slots.long()], key.to(cache_dtype), rtol=0, atol=0)


def test_negative_slots_are_skipped_and_strided_inputs(device: torch.device) -> None:
    num_tokens, heads, head_dim, bs = 5, 4, 32, 16
    # key/value as views into a fused [T, (Hq + 2 Hkv) * D] buffer: token stride != H * D.
    fused = torch.randn(num_tokens, (8 + 2 * heads) * head_dim, device=device)
    key = fused[:, 8 * head_dim : (8 + heads) * head_dim].view(num_tokens, heads, head_dim)
    value = fused[:, (8 + heads) * head_dim :].view(num_tokens, heads, head_dim)
    assert not key.is_contiguous()
    cache = torch.zeros(2, 2, bs, heads, head_dim, device=device)
    slots = torch.tensor([3, -1, 17, -1, 0], dtype=torch.int32, device=device)
    write_kv_cache(key, value, cache, slots)
    expected = torch.zeros_like(cache)
    write_kv_cache_ref(key, value, expected, slots)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    written = (cache[0].reshape(-1, heads * head_dim) != 0).any(-1).nonzero().flatten()
    assert written.tolist() == [0, 3, 17]


def test_empty_and_bad_inputs(device: torch.device) -> None:
    cache = torch.zeros(2, 1, 16, 2, 32, device=device)
    empty = torch.empty(0, 2, 32, device=device)
    write_kv_cache(empty, empty, cache, torch.empty(0, dtype=torch.int32, device=device))
    assert not cache.any()
    key = torch.zeros(3, 2, 32, device=device)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, cache, torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="int32 or int64"):
        write_kv_cache(key, key, cache, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="key must be"):
        write_kv_cache(torch.zeros(3, 4, 32, device=device), key, cache, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens_per_block", [16, 64])
@pytest.mark.parametrize(("heads", "head_dim"), [(8, 128), (1, 64), (4, 96)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.gpu
@requires_cuda
def test_gpu_large(
    dtype: torch.dtype,
    tokens_per_block: int,
    heads: int,
    head_dim: int,
    slot_dtype: torch.dtype,
) -> None:
    num_blocks, num_tokens = 4096, 8192
    cache = torch.randn(2, num_blocks, tokens_per_block, heads, head_dim, device="cuda")
    cache = cache.to(dtype)
    key = torch.randn(num_tokens, heads, head_dim, device="cuda", dtype=dtype)
    value = torch.randn(num_tokens, heads, head_dim, device="cuda", dtype=dtype)
    slots = _slots(num_tokens, num_blocks * tokens_per_block, seed=2).to("cuda", slot_dtype)
    slots[::7] = -1
    expected = cache.clone()
    write_kv_cache_ref(key, value, expected, slots)
    write_kv_cache(key, value, cache, slots)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
