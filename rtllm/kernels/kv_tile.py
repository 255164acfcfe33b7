"""Quantized KV tiles inside the attention kernels (shared by context and decode).

A quantized cache holds int8 / float8_e4m3fn codes and one float32 scale per (K or V,
token, KV head) (:mod:`rtllm.kernels.kv_quant`). Attention uses them without
dequantizing tiles element by element:

* scores: ``q . (k_code * k_scale) = (q . k_code) * k_scale`` — the codes enter
  ``tl.dot`` as they are and the per-key scales multiply the score columns;
* values: ``sum_n p_n v_scale_n v_code_n`` — the per-key scales fold into the
  probabilities, so the codes enter ``tl.dot`` as they are. The folded weights are
  ``p * (v_scale / max(v_scale))`` (all in [0, 1]) and the tile's largest scale
  multiplies the product afterwards, so float16 holds them without overflow.

The dot operand type is float16 for 16-bit queries: int8 and E4M3 codes are exact
in float16, and E4M3 converts to float16 in one instruction per pair on Hopper,
while a bfloat16 operand costs a conversion through float32 per element (measured:
the quantized decode kernel was slower than the bf16 one). Queries are clamped to
float16's range first. float32 queries keep float32 operands.

V codes are stored transposed per block (:func:`value_code_tile`), so both code tiles
reach the MMA along their reduction axis.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP16_MAX = tl.constexpr(65504.0)


def dot_dtype(query_dtype: torch.dtype) -> tl.dtype:
    """The ``tl.dot`` operand type of quantized tiles for queries of ``query_dtype``."""
    return tl.float32 if query_dtype == torch.float32 else tl.float16


@triton.jit
def dot_operand(q, DOT_DTYPE: tl.constexpr):
    """The query as a quantized tile's dot operand (clamped into float16's range)."""
    x = q.to(tl.float32)
    if DOT_DTYPE == tl.float16:  # noqa: SIM300 (a constexpr, not a constant)
        x = tl.minimum(tl.maximum(x, -_FP16_MAX), _FP16_MAX)
    return x.to(DOT_DTYPE)


@triton.jit
def paged_kv_scales(
    k_scale_ptr,
    v_scale_ptr,
    block,
    offs_n,
    n_mask,
    kv_head,
    stride_s_block,
    stride_s_tok,
    TOKENS_PER_BLOCK: tl.constexpr,
):
    """The K and V scales of keys ``offs_n`` (0 where masked) in physical ``block``s."""
    s_off = (
        block.to(tl.int64) * stride_s_block + (offs_n % TOKENS_PER_BLOCK) * stride_s_tok + kv_head
    )
    k_scale = tl.load(k_scale_ptr + s_off, mask=n_mask, other=0.0)
    v_scale = tl.load(v_scale_ptr + s_off, mask=n_mask, other=0.0)
    return k_scale, v_scale


@triton.jit
def value_code_tile(
    v_cache_ptr,
    block,
    start_n,
    kv_head,
    stride_c_block,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
):
    """The V codes ``[BLOCK_N, BLOCK_D]`` of keys ``start_n..`` in physical ``block``s,
    from the per-block transposed layout ``[num_kv_heads, head_dim, tokens]``
    (:mod:`rtllm.kernels.kv_quant`).

    ``start_n`` must be a multiple of ``min(BLOCK_N, TOKENS_PER_BLOCK)``: each block's
    run of tokens is then contiguous, and the tile loads as a K-major MMA operand
    (16-byte loads, no byte-wise transpose). Keys are not masked: past a sequence's end
    they read finite codes (the cache holds no NaN) that the caller weighs with 0.
    """
    RUN: tl.constexpr = BLOCK_N if BLOCK_N < TOKENS_PER_BLOCK else TOKENS_PER_BLOCK
    VEC: tl.constexpr = RUN if RUN < 16 else 16
    tok = (start_n + tl.arange(0, BLOCK_N)) % TOKENS_PER_BLOCK
    offs_d = tl.arange(0, BLOCK_D)
    row = block.to(tl.int64) * stride_c_block + kv_head * (HEAD_DIM * TOKENS_PER_BLOCK) + tok
    offs = row[None, :] + offs_d[:, None] * TOKENS_PER_BLOCK
    offs = tl.max_contiguous(tl.multiple_of(offs, [1, VEC]), [1, RUN])
    if HEAD_DIM == BLOCK_D:
        v_t = tl.load(v_cache_ptr + offs)
    else:
        v_t = tl.load(v_cache_ptr + offs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
    return tl.trans(v_t)


@triton.jit
def quant_scores(q_dot, k_codes, k_scale, scale_log2e, DOT_PRECISION: tl.constexpr):
    """Scores ``[M, N]`` (log2 domain, float32) of ``q_dot`` against a code tile."""
    s = tl.dot(q_dot, tl.trans(k_codes.to(q_dot.dtype)), input_precision=DOT_PRECISION)
    return s * (k_scale * scale_log2e)[None, :]


@triton.jit
def quant_weighted_values(
    p, v_codes, v_scale, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """``p @ (v_codes * v_scale[:, None])`` ``[M, D]`` float32, scales folded into ``p``."""
    v_max = tl.max(v_scale, 0)
    v_max = tl.where(v_max > 0.0, v_max, 1.0)
    w = (p * (v_scale / v_max)[None, :]).to(DOT_DTYPE)
    return tl.dot(w, v_codes.to(DOT_DTYPE), input_precision=DOT_PRECISION) * v_max
