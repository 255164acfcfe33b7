"""Quantized KV cache (int8 / float8_e4m3fn + per-(token, head) float32 scales): the
quantize/dequantize reference, the quantizing cache write and both attention kernels.

On CPU the kernels run in Triton's interpreter. Its float32 -> float8 conversion is
wrong where rounding carries into the exponent (127.9 -> 64 instead of 128, seen with
Triton 3.6), so the FP8 *write* kernel is tested on CUDA only; FP8 *reads* (loads and
float8 -> float conversion) are exact in the interpreter and are tested everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.context_attention import context_attention  # noqa: E402
from rtllm.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from rtllm.kernels.kv_cache_write import write_kv_cache, write_kv_cache_ref  # noqa: E402
from rtllm.kernels.kv_quant import (  # noqa: E402
    KV_QMAX,
    allocate_kv_layer,
    code_rows,
    dequantize_kv,
    quantize_kv,
    quantize_kv_cache,
    raw_view,
    store_code_rows,
)
from rtllm.kernels.paged_attention_ref import context_attention_ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
FP8 = torch.float8_e4m3fn
QDTYPES = [torch.int8, FP8]


def _write_dtypes() -> list:
    fp8 = pytest.param(FP8, marks=requires_cuda)  # interpreter's fp32 -> fp8 cast is buggy
    return [torch.int8, fp8]


@pytest.mark.parametrize("dtype", QDTYPES)
def test_quantize_roundtrip_error_bound(dtype: torch.dtype) -> None:
    """|x - q * scale| <= scale / 2 for int8 (round to nearest); for E4M3 (3 mantissa
    bits) <= 2^-4 |x| in the normal range plus half a subnormal step (2^-10 * scale)."""
    x = torch.randn(64, 4, 96, generator=torch.Generator().manual_seed(0)) * 5
    x[3, 1] = 0.0  # an all-zero row: scale 0, codes 0
    x[5, 2, 7] = 300.0  # an outlier only squeezes its own row
    codes, scale = quantize_kv(x, dtype)
    assert codes.dtype == dtype and scale.shape == (64, 4) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(-1) / KV_QMAX[dtype], rtol=0, atol=0)
    assert scale[3, 1] == 0 and not codes[3, 1].float().any()
    err = (dequantize_kv(codes, scale, torch.float32) - x).abs()
    if dtype == torch.int8:
        assert codes.abs().max() == 127
        assert (err <= scale[..., None] * 0.5 * (1 + 1e-5)).all()
    else:
        bound = x.abs() * 2.0**-4 + scale[..., None] * 2.0**-10
        assert (err <= bound * (1 + 1e-5)).all()
    # Half away from zero for int8 ties: 0.5 -> 1, -0.5 -> -1 (torch.round would give 0).
    ties = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5]])
    assert quantize_kv(ties, torch.int8)[0].tolist() == [[127, 1, -1, 2, -3]]


@pytest.mark.parametrize("dtype", _write_dtypes())
@pytest.mark.parametrize("head_dim", [64, 80])
def test_write_matches_reference(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    num_tokens, heads, tokens_per_block, num_blocks = 9, 2, 16, 3
    gen = torch.Generator().manual_seed(head_dim)
    key = (torch.randn(num_tokens, heads, head_dim, generator=gen) * 3).to(device, torch.float16)
    value = torch.randn(num_tokens, heads, head_dim, generator=gen).to(device, torch.float16)
    key[2, 1] = 0
    slots = torch.randperm(num_blocks * tokens_per_block, generator=gen)[:num_tokens]
    slots[4] = -1  # padded row: nothing written
    slots = slots.to(device, torch.int32)
    got = allocate_kv_layer(num_blocks, tokens_per_block, heads, head_dim, dtype, device, zero=True)
    want = allocate_kv_layer(num_blocks, tokens_per_block, heads, head_dim, dtype, device, zero=True)
    write_kv_cache(key, value, got.data, slots, got.scale)
    write_kv_cache_ref(key, value, want.data, slots, want.scale)
    # Scales: amax / QMAX in float32 both ways (GPU division may differ by an ulp).
    torch.testing.assert_close(got.scale, want.scale, rtol=1e-6, atol=0)
    # Codes: equal but for an ulp-level difference at a rounding boundary (one step).
    diff = (got.data.float() - want.data.float()).abs()
    step = 1.0 if dtype == torch.int8 else want.data.float().abs() * 2.0**-3 + 2.0**-9
    assert (diff <= step).all()
    assert (diff > 0).float().mean() < 0.01
    # The padded row wrote nothing, and every real row was written.
    written = want.scale.view(2, -1, heads)
    assert written[:, slots[slots >= 0].long()].count_nonzero() == 2 * 8 * heads - 1
    assert written.count_nonzero() == 2 * 8 * heads - 1  # key[2, 1] is zero: scale 0


def test_scale_argument_is_checked(device: torch.device) -> None:
    key = torch.zeros(1, 2, 16, device=device)
    slots = torch.zeros(1, dtype=torch.int32, device=device)
    plain = torch.zeros(2, 1, 16, 2, 16, device=device)
    quant = allocate_kv_layer(1, 16, 2, 16, torch.int8, device, zero=True)
    with pytest.raises(ValueError, match="only for int8/fp8"):
        write_kv_cache(key, key, plain, slots, quant.scale)
    with pytest.raises(ValueError, match="needs its kv_scale"):
        write_kv_cache(key, key, quant.data, slots)
    with pytest.raises(ValueError, match="kv_scale must be float32"):
        write_kv_cache(key, key, quant.data, slots, quant.scale.half())


def _quantized(b, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's float cache quantized as the write kernel would."""
    codes, scale = quantize_kv_cache(b.kv_cache.cpu().float(), dtype)
    return codes.to(b.kv_cache.device), scale.to(b.kv_cache.device)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # Kernel vs reference on the same codes: float32 math on both sides, so only the
    # query dtype's rounding (and V dequantized to it inside the kernel) differs.
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


# Error of attention over the quantized cache against the unquantized cache (K, V, q
# ~N(0, 1)): (max |error| / max |output|, mean |error|). Measured on these shapes: int8
# <= 0.009 and 0.0026; E4M3 <= 0.036 and 0.0098. E4M3's bound is its relative step 2^-4.
QUANT_ERROR_BOUNDS = {torch.int8: (0.015, 0.004), FP8: (2.0**-4, 0.015)}


def _assert_quant_error(out: torch.Tensor, exact: torch.Tensor, qdtype: torch.dtype) -> None:
    err = (out.float() - exact.float()).abs()
    max_bound, mean_bound = QUANT_ERROR_BOUNDS[qdtype]
    assert err.max() <= max_bound * exact.abs().max(), (err.max(), exact.abs().max())
    assert err.mean() <= mean_bound, err.mean()


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize(
    ("group", "head_dim", "window", "dtype"),
    [(1, 64, None, torch.float32), (4, 80, None, torch.float16), (2, 64, 7, torch.float32)],
)
def test_context_attention_quantized(
    paged_batch: Callable,
    device: torch.device,
    qdtype: torch.dtype,
    group: int,
    head_dim: int,
    window: int | None,
    dtype: torch.dtype,
) -> None:
    b = paged_batch([5, 1, 20, 3], [0, 17, 9, 40], 2 * group, 2, head_dim, 16, dtype, device)
    codes, scale = _quantized(b, qdtype)
    args = (b.cu_seqlens_q, b.seq_lens, b.block_tables, b.max_query_len, head_dim**-0.5, window)
    expected = context_attention_ref(b.query, codes, *args, kv_scale=scale)
    out = context_attention(b.query, codes, *args, kv_scale=scale, block_m=16, block_n=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **_tol(dtype))
    exact = context_attention_ref(b.query, b.kv_cache, *args)
    _assert_quant_error(out, exact, qdtype)


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize(
    ("group", "head_dim", "window", "num_splits", "dtype"),
    [
        (1, 64, None, 1, torch.float32),
        (4, 64, None, 3, torch.float16),
        (8, 80, 9, 2, torch.float32),
    ],
)
def test_decode_attention_quantized(
    paged_batch: Callable,
    device: torch.device,
    qdtype: torch.dtype,
    group: int,
    head_dim: int,
    window: int | None,
    num_splits: int,
    dtype: torch.dtype,
) -> None:
    b = paged_batch([1, 1, 1], [0, 20, 45], 2 * group, 2, head_dim, 16, dtype, device)
    codes, scale = _quantized(b, qdtype)
    args = (b.seq_lens, b.block_tables, head_dim**-0.5, window)
    expected = decode_attention_ref(b.query, codes, *args, kv_scale=scale)
    out = decode_attention(b.query, codes, *args, num_splits=num_splits, kv_scale=scale, block_n=16)
    torch.testing.assert_close(out, expected, **_tol(dtype))
    exact = decode_attention_ref(b.query, b.kv_cache, *args)
    _assert_quant_error(out, exact, qdtype)


def test_fp8_codes_move_as_bytes() -> None:
    """raw_view gives CPU-indexable bytes that round-trip float8 codes exactly."""
    codes, _ = quantize_kv(torch.randn(4, 2, 16), FP8)
    moved = torch.zeros(8, 2, 16, dtype=torch.uint8)
    moved.index_copy_(0, torch.tensor([6, 1, 3, 0]), raw_view(codes))
    back = moved.view(FP8)[torch.tensor([6, 1, 3, 0])]
    assert torch.equal(back.float(), codes.float())


@requires_cuda
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_realistic_gpu_prefill_then_decode(paged_batch: Callable, qdtype: torch.dtype) -> None:
    """bf16, 32 heads / 8 KV heads, head_dim 128, 2k-token prompts: write + prefill +
    decode through the kernels against the float32 reference on the same codes."""
    b = paged_batch([700, 1], [0, 2047], 32, 8, 128, 64, torch.bfloat16, "cuda", seed=3)
    layer = allocate_kv_layer(b.kv_cache.shape[1], 64, 8, 128, qdtype, "cuda", zero=True)
    # Write every cached row through the kernel (slots of all positions of both sequences).
    flat = b.kv_cache.view(2, -1, 8, 128)
    slots = torch.arange(flat.shape[1], device="cuda", dtype=torch.int32)
    write_kv_cache(flat[0], flat[1], layer.data, slots, layer.scale)
    args = (b.cu_seqlens_q, b.seq_lens, b.block_tables, b.max_query_len, 128**-0.5)
    q0 = b.query[:700]
    ref_args = (b.cu_seqlens_q[:2], b.seq_lens[:1], b.block_tables[:1], 700, 128**-0.5)
    out = context_attention(b.query, layer.data, *args, kv_scale=layer.scale)[:700]
    ref = context_attention_ref(q0, layer.data, *ref_args, kv_scale=layer.scale)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    dec = decode_attention(b.query[700:], layer.data, b.seq_lens[1:], b.block_tables[1:],
                           128**-0.5, max_seq_len=2048, kv_scale=layer.scale)
    dec_ref = decode_attention_ref(b.query[700:], layer.data, b.seq_lens[1:], b.block_tables[1:],
                                   128**-0.5, kv_scale=layer.scale)
    torch.testing.assert_close(dec, dec_ref, rtol=2e-2, atol=2e-2)
    exact = decode_attention_ref(b.query[700:], b.kv_cache, b.seq_lens[1:], b.block_tables[1:],
                                 128**-0.5)
    _assert_quant_error(dec, exact, qdtype)


@pytest.mark.parametrize("qdtype", _write_dtypes())
def test_value_codes_are_stored_transposed_per_block(device: torch.device, qdtype: torch.dtype) -> None:
    """K rows keep the [tokens, heads, head_dim] block layout; V codes are stored
    [heads, head_dim, tokens] per block; code_rows / store_code_rows convert both ways."""
    tokens_per_block, heads, head_dim = 8, 2, 16
    gen = torch.Generator().manual_seed(7)
    key, value = (torch.randn(3, heads, head_dim, generator=gen).to(device) for _ in range(2))
    slots = torch.tensor([9, 2, 15], dtype=torch.int32, device=device)  # blocks 1, 0, 1
    layer = allocate_kv_layer(2, tokens_per_block, heads, head_dim, qdtype, device, zero=True)
    write_kv_cache(key, value, layer.data, slots, layer.scale)
    # Codes as floats; the GPU may round a boundary value one step apart from torch.
    k_codes, v_codes = (quantize_kv(x.cpu(), qdtype)[0].float() for x in (key, value))
    stored = layer.data.cpu().float()
    by_head = stored[1].reshape(2, heads, head_dim, tokens_per_block)
    close = {"rtol": 2.0**-3, "atol": 1.0}
    for row, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, tokens_per_block)
        torch.testing.assert_close(stored[0, block, offset], k_codes[row], **close)
        torch.testing.assert_close(by_head[block, :, :, offset], v_codes[row], **close)
    rows = code_rows(layer.data)
    logical_v = rows.cpu().float()[1].reshape(-1, heads, head_dim)
    torch.testing.assert_close(logical_v[slots.long().cpu()], v_codes, **close)
    again = torch.empty_like(layer.data)
    store_code_rows(again, rows)
    assert torch.equal(raw_view(again), raw_view(layer.data))
