"""Generation (decode) attention over the paged KV cache: split-K flash-decoding (Triton).

Each sequence has one new query token at position ``seq_len - 1`` (its K/V already in
the cache), so it attends to every cached key (or the last ``sliding_window``).

Stage 1, grid ``(batch, num_kv_heads, num_splits)``: a program takes the ``group``
query heads that share one KV head (so each K/V tile is loaded once for all of them)
and one contiguous slice of the key range, and writes that slice's normalised output
and log-sum-exp. Stage 2, grid ``(batch, num_heads)``, merges the slices. With one
split, stage 1 writes the final output and stage 2 is skipped.

Padded rows (CUDA-graph batches) carry ``seq_len == 0`` and get zeros.

A quantized cache (int8 / float8_e4m3fn codes plus float32 ``kv_scale``, see
:mod:`rtllm.kernels.kv_quant`) is read in stage 1 by the tile helpers of
:mod:`rtllm.kernels.kv_tile` (shared with :mod:`rtllm.kernels.context_attention`):
codes enter ``tl.dot`` as they are, scales multiply scores and fold into the
probabilities. The ``QUANT`` constexpr leaves the unquantized kernel unchanged.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rtllm.kernels.context_attention import (
    check_paged_inputs,
    gather_paged_kv,
    reference_attention,
)
from rtllm.kernels.kv_tile import (
    dot_dtype,
    dot_operand,
    paged_kv_scales,
    quant_scores,
    quant_weighted_values,
)
from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers

_LOG2E = 1.4426950408889634
MAX_SPLITS = 128
MIN_TOKENS_PER_SPLIT = 128


# Split counts and windows vary between calls: no compiled variant per value class.
@triton.jit(do_not_specialize=["sliding_window", "num_splits"])
def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    scale_log2e,
    sliding_window,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    stride_s_block,
    stride_s_tok,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - sliding_window, 0)
    # Split [kv_lo, seq_len) into num_splits slices of whole BLOCK_N tiles; trailing
    # slices may be empty (they report lse = -inf and weigh nothing in the merge).
    span = seq_len - kv_lo
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = kv_lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g  # query head h uses kv head h // GROUP
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    seq64 = seq.to(tl.int64)
    q = tl.load(
        q_ptr + seq64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if QUANT:
        q = dot_operand(q, DOT_DTYPE)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq64 * stride_bt
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table_row + offs_n // TOKENS_PER_BLOCK, mask=n_mask, other=0)
        kv_off = (
            block.to(tl.int64) * stride_c_block
            + (offs_n % TOKENS_PER_BLOCK) * stride_c_tok
            + kv_head * stride_c_head
        )
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if QUANT:
            k_scale, v_scale = paged_kv_scales(
                k_scale_ptr, v_scale_ptr, block, offs_n, n_mask, kv_head,
                stride_s_block, stride_s_tok, TOKENS_PER_BLOCK,
            )  # fmt: skip
            s = quant_scores(q, k, k_scale, scale_log2e, DOT_PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds >= 1 valid key, so m_new is finite after the first tile.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if QUANT:
            pv = quant_weighted_values(p, v, v_scale, DOT_DTYPE, DOT_PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + seq64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=gd_mask,
        )
    else:
        # Partials are [batch, num_heads, num_splits, (BLOCK_D)] float32, contiguous.
        row = (seq64 * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :], o, mask=gd_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))  # log2 domain
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row0 = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    lse = tl.load(part_lse_ptr + row0 + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # All splits empty (padded row, seq_len == 0): weights 0, output 0, no NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.math.exp2(lse - lse_max)
    denom = tl.sum(weights, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    o = tl.load(
        part_o_ptr + (row0 + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(o * weights[:, None], 0) / denom
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int | None,
    num_sms: int,
) -> int:
    """Number of KV slices per (sequence, KV head) for :func:`decode_attention`.

    ``batch * num_kv_heads`` programs already fill the GPU once they reach two per SM:
    no split. Below that, split until there are about four programs per SM, so a small
    batch over a long context streams KV on every SM, but give each slice at least
    ``MIN_TOKENS_PER_SPLIT`` keys (the merge and the partial writes are overhead) and
    use at most ``MAX_SPLITS``. ``max_seq_len=None`` (CUDA-graph capture, where lengths
    vary between replays) drops the length bound; slices past a sequence's end are then
    empty programs that exit at once. (On an H200 this was within ~5% of the best
    split count swept for batch 1-256 and 1k-32k tokens.)
    """
    base = max(1, batch * num_kv_heads)
    if base >= 2 * num_sms:
        return 1
    splits = triton.cdiv(4 * num_sms, base)
    if max_seq_len is not None:
        splits = min(splits, max(1, max_seq_len // MIN_TOKENS_PER_SPLIT))
    return max(1, min(splits, MAX_SPLITS))


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV (split-K).

    Args:
        query: ``[batch, num_heads, head_dim]`` (token/head strides free), the token at
            position ``seq_lens[b] - 1`` of sequence ``b``.
        kv_cache: ``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]``, same
            dtype as ``query`` (or int8 / float8_e4m3fn codes with ``kv_scale``),
            already holding this step's K/V.
        seq_lens: int32 ``[batch]`` keys per sequence (0 marks a padded row: output 0).
        block_tables: int32 ``[batch, max_blocks]``.
        scale: softmax scale.
        sliding_window: attend to the last ``sliding_window`` keys only.
        max_seq_len: host-side upper bound of ``seq_lens`` for the split heuristic
            (``None``: occupancy only, for CUDA graphs).
        num_splits: force the number of KV slices (default :func:`choose_num_splits`).
        out: optional ``[batch, num_heads, head_dim]`` output buffer.
        kv_scale: float32 ``[2, num_blocks, tokens_per_block, num_kv_heads]`` scales of
            a quantized ``kv_cache`` (see :mod:`rtllm.kernels.kv_quant`).
        block_n, num_warps, num_stages: tuning overrides (tests use small tiles).

    Returns:
        ``[batch, num_heads, head_dim]`` in ``query``'s dtype.
    """
    num_heads, num_kv_heads, head_dim, group = check_paged_inputs(
        query, kv_cache, seq_lens, block_tables, kv_scale
    )
    batch = query.shape[0]
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} rows for {batch} queries")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError("out must match query's shape with contiguous head_dim")
    if batch == 0:
        return out
    on_gpu = query.device.type == "cuda"
    if num_splits is None:
        sms = _num_sms(query.device.index or 0) if on_gpu else 4
        num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, sms)
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    bn = block_n or (64 if on_gpu else 16)
    block_d = max(16, triton.next_power_of_2(head_dim))
    window = sliding_window or 0
    single = num_splits == 1
    if single:
        part_o = part_lse = out  # unused by the kernel in this mode
    else:
        part_o = torch.empty(
            batch, num_heads, num_splits, block_d, dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty(
            batch, num_heads, num_splits, dtype=torch.float32, device=query.device
        )
    quant = kv_scale is not None
    pdl = use_pdl(query.device)
    scales = kv_scale if quant else kv_cache  # unquantized: never read
    _decode_partial_kernel[(batch, num_kv_heads, num_splits)](
        query,
        kv_cache[0],
        kv_cache[1],
        scales[0],
        scales[1],
        seq_lens,
        block_tables,
        out,
        part_o,
        part_lse,
        scale * _LOG2E,
        window,
        num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        scales.stride(1),
        scales.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        TOKENS_PER_BLOCK=kv_cache.shape[2],
        BLOCK_N=bn,
        USE_WINDOW=window > 0,
        SINGLE_SPLIT=single,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        QUANT=quant,
        DOT_DTYPE=dot_dtype(query.dtype),
        USE_PDL=pdl,
        num_warps=num_warps or 4,
        num_stages=num_stages or 2,
        launch_pdl=pdl,
    )
    if not single:
        block_s = triton.next_power_of_2(num_splits)
        _decode_reduce_kernel[(batch, num_heads)](
            part_o,
            part_lse,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=block_s,
            USE_PDL=pdl,
            num_warps=4 if block_s * block_d <= 4096 else 8,
            launch_pdl=pdl,
        )
    return out


def decode_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`decode_attention` (float32 math, ``query``'s dtype out;
    a quantized cache is dequantized to float32 first)."""
    check_paged_inputs(query, kv_cache, seq_lens, block_tables, kv_scale)
    out = torch.zeros_like(query)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        keys, values = gather_paged_kv(kv_cache, block_tables[b], seq_len, kv_scale)
        out[b] = reference_attention(
            query[b : b + 1], keys, values, seq_len - 1, scale, sliding_window
        )[0].to(query.dtype)
    return out
