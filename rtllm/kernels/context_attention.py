"""Prefill (context) attention over the paged KV cache (Triton); its PyTorch reference is
:func:`rtllm.kernels.paged_attention_ref.context_attention_ref`.

The batch is packed: sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``
and has ``seq_lens[b]`` keys in the cache, the last ``query_len`` of which belong to
those rows (their K/V must already be written, see :mod:`rtllm.kernels.kv_cache_write`).
Keys are read through ``block_tables``, so a cached prefix (chunked context, prefix-cache
hit) is handled with no extra work; query row ``i`` sits at absolute position
``seq_len - query_len + i`` and attends causally (optionally within a sliding window of
``sliding_window`` keys, itself included).

The kernel is flash-attention style: one program per (query block, head, sequence),
an online softmax in float32 over key tiles gathered slot by slot from the cache.

Quantized caches (int8 / float8_e4m3fn codes plus a float32 ``kv_scale`` per (K or V,
token, KV head), see :mod:`rtllm.kernels.kv_quant`) are dequantized inside the kernel:
codes enter ``tl.dot`` as they are and the scales multiply scores / fold into the
probabilities (:mod:`rtllm.kernels.kv_tile`, shared with the decode kernel). The
``QUANT`` constexpr keeps the unquantized kernel exactly as it was.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.kv_tile import (
    dot_dtype,
    dot_operand,
    paged_kv_scales,
    quant_scores,
    quant_weighted_values,
    value_code_tile,
)
from rtllm.kernels.paged_attention_ref import check_paged_inputs

_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, n_mask, d_mask, MASK_N: tl.constexpr, MASK_D: tl.constexpr):
    """Load a [BLOCK_N, BLOCK_D] tile, masking only the dimensions that can overhang."""
    if MASK_N:
        if MASK_D:
            x = tl.load(ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=n_mask[:, None], other=0.0)
    elif MASK_D:
        x = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    start_n,
    q_pos,
    seq_len,
    sliding_window,
    table_row,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    kv_head,
    scale_log2e,
    stride_c_block,
    stride_v_block,
    stride_c_tok,
    stride_c_head,
    stride_s_block,
    stride_s_tok,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N).

    MASKED=False is only legal for tiles that every query row may see in full
    (all keys < seq_len and <= the first row's position, no window).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seq_len
    d_mask = offs_d < HEAD_DIM
    # Per-key gather of the physical block: any BLOCK_N works with any tokens_per_block.
    if MASKED:
        # Masked per block, not per key: the keys of one block share its id (as
        # value_code_tile's contiguous runs require).
        block_idx = offs_n // TOKENS_PER_BLOCK
        block = tl.load(
            table_row + block_idx, mask=block_idx * TOKENS_PER_BLOCK < seq_len, other=0
        )
    else:
        block = tl.load(table_row + offs_n // TOKENS_PER_BLOCK)
    in_block = (offs_n % TOKENS_PER_BLOCK) * stride_c_tok + kv_head * stride_c_head
    ptrs = (block.to(tl.int64) * stride_c_block + in_block)[:, None] + offs_d[None, :]
    k = _load_tile(k_cache_ptr + ptrs, n_mask, d_mask, MASKED, HEAD_DIM != BLOCK_D)
    if QUANT:
        # Per-key scales (0 for masked keys: their scores are masked below anyway);
        # q is already the dot operand (kv_tile.dot_operand).
        k_scale, v_scale = paged_kv_scales(
            k_scale_ptr, v_scale_ptr, block, offs_n, n_mask, kv_head,
            stride_s_block, stride_s_tok, TOKENS_PER_BLOCK,
        )  # fmt: skip
        s = quant_scores(q, k, k_scale, scale_log2e, DOT_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
    if MASKED:
        allowed = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed yet keeps m = -inf; subtract 0 instead to avoid NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    # V may have its own block stride (prompt_attention's fresh K/V); the paged cache's
    # K and V share every stride.
    if QUANT:
        # Paged V codes are stored transposed per block (kv_quant); tiles start at
        # multiples of BLOCK_N.
        v = value_code_tile(
            v_cache_ptr, block, start_n, kv_head, stride_c_block,
            HEAD_DIM, BLOCK_D, BLOCK_N, TOKENS_PER_BLOCK,
        )  # fmt: skip
        pv = quant_weighted_values(p, v, v_scale, DOT_DTYPE, DOT_PRECISION)
    else:
        v_ptrs = (block.to(tl.int64) * stride_v_block + in_block)[:, None] + offs_d[None, :]
        v = _load_tile(v_cache_ptr + v_ptrs, n_mask, d_mask, MASKED, HEAD_DIM != BLOCK_D)
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["sliding_window"])
def _context_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale_log2e,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_c_block,
    stride_v_block,
    stride_c_tok,
    stride_c_head,
    stride_s_block,
    stride_s_tok,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m_start = pid_m * BLOCK_M
    # The grid covers the longest query of the batch; shorter sequences' extra blocks exit.
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # cached tokens before this step's queries
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if QUANT:
        q = dot_operand(q, DOT_DTYPE)
    q_pos = ctx_len + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys < hi can be seen by some row of this block (causal upper bound).
    hi = tl.minimum(seq_len, ctx_len + m_start + BLOCK_M)
    if USE_WINDOW:
        # Keys >= lo can be seen by some row; every tile needs the window mask.
        lo = tl.maximum(ctx_len + m_start - sliding_window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        for start_n in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start_n, q_pos, seq_len, sliding_window, table_row,
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, kv_head, scale_log2e,
                stride_c_block, stride_v_block, stride_c_tok, stride_c_head, stride_s_block, stride_s_tok,
                HEAD_DIM, BLOCK_D, BLOCK_N, TOKENS_PER_BLOCK, True, True, DOT_PRECISION, QUANT,
                DOT_DTYPE,
            )  # fmt: skip
    else:
        # Tiles ending at or before the first row's position + 1 are seen in full by
        # every row (padded rows included): no mask. The rest straddle the diagonal.
        full_hi = ((ctx_len + m_start + 1) // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start_n, q_pos, seq_len, sliding_window, table_row,
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, kv_head, scale_log2e,
                stride_c_block, stride_v_block, stride_c_tok, stride_c_head, stride_s_block, stride_s_tok,
                HEAD_DIM, BLOCK_D, BLOCK_N, TOKENS_PER_BLOCK, False, False, DOT_PRECISION, QUANT,
                DOT_DTYPE,
            )  # fmt: skip
        for start_n in range(full_hi, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start_n, q_pos, seq_len, sliding_window, table_row,
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, kv_head, scale_log2e,
                stride_c_block, stride_v_block, stride_c_tok, stride_c_head, stride_s_block, stride_s_tok,
                HEAD_DIM, BLOCK_D, BLOCK_N, TOKENS_PER_BLOCK, True, False, DOT_PRECISION, QUANT,
                DOT_DTYPE,
            )  # fmt: skip

    # Every real row sees at least itself, so l_i > 0 there; padded rows are not stored.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _default_blocks(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # interpreter: small tiles keep tests quick
    # Picked by a sweep on an H200 (bf16, 32 heads / 8 KV heads, 2k-8k tokens); small
    # enough in shared memory for pre-Hopper GPUs too.
    if head_dim <= 64:
        return 64, 64, 4, 2
    if head_dim <= 128:
        return 64, 64, 4, 3
    return 64, 32, 4, 2


def context_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over paged keys (context / mixed steps).

    Args:
        query: ``[num_tokens, num_heads, head_dim]`` (token/head strides free).
        kv_cache: ``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]`` holding
            every key of every sequence, this step's included; same dtype as ``query``,
            or int8 / float8_e4m3fn codes with ``kv_scale``.
        cu_seqlens_q: int32 ``[batch + 1]`` query row offsets (``cu[-1] == num_tokens``).
        seq_lens: int32 ``[batch]`` total keys per sequence (cached + new).
        block_tables: int32 ``[batch, max_blocks]``.
        max_query_len: host int, the longest query of the batch (sizes the grid).
        scale: softmax scale.
        sliding_window: attend to at most this many keys (the query's own included).
        out: optional ``[num_tokens, num_heads, head_dim]`` output buffer.
        kv_scale: float32 ``[2, num_blocks, tokens_per_block, num_kv_heads]`` scales of
            a quantized ``kv_cache`` (see :mod:`rtllm.kernels.kv_quant`).
        block_m, block_n, num_warps, num_stages: tuning overrides (tests use small
            tiles to reach the multi-tile paths).

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in ``query``'s dtype.
    """
    num_heads, _, head_dim, group = check_paged_inputs(
        query, kv_cache, seq_lens, block_tables, kv_scale
    )
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape != (seq_lens.shape[0] + 1,):
        raise ValueError("cu_seqlens_q must be int32 [batch + 1]")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError("out must match query's shape with contiguous head_dim")
    batch = seq_lens.shape[0]
    if query.shape[0] == 0 or batch == 0 or max_query_len <= 0:
        return out
    return launch_context_kernel(
        query, kv_cache[0], kv_cache[1], kv_scale, out, cu_seqlens_q, seq_lens, block_tables,
        max_query_len, scale, sliding_window, group, block_m, block_n, num_warps, num_stages,
    )  # fmt: skip


def launch_context_kernel(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_scale: torch.Tensor | None,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    group: int,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Launch the kernel on checked inputs: ``k_cache`` / ``v_cache`` ``[num_blocks,
    tokens_per_block, num_kv_heads, head_dim]`` share the token and head strides (their
    block strides may differ); ``kv_scale`` as in :func:`context_attention`."""
    batch, head_dim = seq_lens.shape[0], query.shape[2]
    default_m, default_n, default_warps, default_stages = _default_blocks(head_dim, query.device)
    bm, bn = block_m or default_m, block_n or default_n
    window = sliding_window or 0
    quant = kv_scale is not None
    if quant and query.device.type == "cuda":
        # H200, 64 prompts x 256 tokens over FP8 codes: 3 stages spill registers
        # (666 us), 2 stages do not (492 us).
        default_stages = 2
    scales = kv_scale if quant else k_cache[None]  # unquantized: never read
    grid = (triton.cdiv(max_query_len, bm), query.shape[1], batch)
    _context_attention_kernel[grid](
        query,
        k_cache,
        v_cache,
        scales[0],
        scales[-1],
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        scale * _LOG2E,
        window,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        v_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        scales.stride(1),
        scales.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        GROUP=group,
        TOKENS_PER_BLOCK=k_cache.shape[1],
        BLOCK_M=bm,
        BLOCK_N=bn,
        USE_WINDOW=window > 0,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        QUANT=quant,
        DOT_DTYPE=dot_dtype(query.dtype),
        num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages,
    )
    return out
