"""Generation (decode) attention over the paged KV cache: split-K flash-decoding (Triton).

Each sequence has one new query token at position ``seq_len - 1`` (its K/V already in
the cache), so it attends to every cached key (or the last ``sliding_window``).

Grid ``(batch, num_kv_heads, num_splits)``: a program takes the ``group``
query heads that share one KV head (so each K/V tile is loaded once for all of them)
and one contiguous slice of the key range, and writes that slice's normalised output
and log-sum-exp; the last program of a ``(sequence, KV head)`` to finish merges the
slices in the same launch (:mod:`rtllm.kernels.split_counters`; at batch 1 the merge
was a second kernel per layer). Programs whose slice lies past the sequence's keys
leave at once and are not counted; when the keys fit in one slice (always so with one
split) its program writes the output itself.

Padded rows (CUDA-graph batches) carry ``seq_len == 0`` and get zeros.

A quantized cache (int8 / float8_e4m3fn codes plus float32 ``kv_scale``, see
:mod:`rtllm.kernels.kv_quant`) is read by the tile helpers of
:mod:`rtllm.kernels.kv_tile` (shared with :mod:`rtllm.kernels.context_attention`):
codes enter ``tl.dot`` as they are, scales multiply scores and fold into the
probabilities. The ``QUANT`` constexpr leaves the unquantized kernel unchanged.
"""

from __future__ import annotations

import functools

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
from rtllm.kernels.paged_attention_ref import check_paged_inputs, context_attention_ref
from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers
from rtllm.kernels.split_counters import MAX_SPLIT_TILES, split_counters

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
    cnt_ptr,
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
    tiles_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - sliding_window, 0)
        # Tiles start at multiples of BLOCK_N (value_code_tile needs it); keys below
        # kv_lo are masked.
        tiles_lo = (kv_lo // BLOCK_N) * BLOCK_N
    # Split [tiles_lo, seq_len) into num_splits slices of whole BLOCK_N tiles; trailing
    # slices may be empty.
    span = seq_len - tiles_lo
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = tiles_lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)
    # Only the first `used` slices hold keys. The others leave at once (no loads, no
    # count: at batch 1 in a CUDA graph most of the fixed split count is past the end),
    # so the merge waits for the used slices only, and a sequence whose keys fit in one
    # slice (or a padded row, which gets zeros) is written by slice 0 directly.
    used = tl.cdiv(span, tl.maximum(per_split, 1))
    if split >= tl.maximum(used, 1):
        return

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
        n_mask = (offs_n < end) & (offs_n >= kv_lo)
        # Masked per block, not per key: the keys of one block then share its id, as
        # value_code_tile's contiguous runs require.
        block_idx = offs_n // TOKENS_PER_BLOCK
        block = tl.load(table_row + block_idx, mask=block_idx * TOKENS_PER_BLOCK < seq_len, other=0)
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
        # Every tile holds >= 1 valid key (the first split starts within BLOCK_N of
        # kv_lo), so m_new is finite after the first tile.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            v = value_code_tile(
                v_cache_ptr, block, start_n, kv_head, stride_c_block,
                HEAD_DIM, BLOCK_D, BLOCK_N, TOKENS_PER_BLOCK,
            )  # fmt: skip
            pv = quant_weighted_values(p, v, v_scale, DOT_DTYPE, DOT_PRECISION)
        else:
            v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    gd_mask = g_mask[:, None] & d_mask[None, :]
    out_rows = out_ptr + seq64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if used <= 1:  # always so with one split
        tl.store(out_rows, o.to(out_ptr.dtype.element_ty), mask=gd_mask)
    elif not SINGLE_SPLIT:
        # Partials are [batch, num_heads, num_splits, (BLOCK_D)] float32, contiguous.
        row0 = (seq64 * (GROUP * tl.num_programs(1)) + heads) * num_splits
        tl.store(part_o_ptr + (row0 + split)[:, None] * BLOCK_D + offs_d[None, :], o, mask=gd_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))  # log2 domain
        tl.store(part_lse_ptr + row0 + split, lse, mask=g_mask)
        tl.debug_barrier()  # every thread's partials are stored before the count
        # acq_rel at GPU scope: our partials are visible before the count, and the last
        # arriver sees everyone's partials after it.
        tile = seq * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == used - 1:
            # Online merge of the used slices, in a fixed order.
            m_all = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            w_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
            merged = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
            for s_idx in range(0, used):
                lse_s = tl.load(part_lse_ptr + row0 + s_idx, mask=g_mask, other=0.0, cache_modifier=".cg")
                o_s = tl.load(
                    part_o_ptr + (row0 + s_idx)[:, None] * BLOCK_D + offs_d[None, :],
                    mask=gd_mask, other=0.0, cache_modifier=".cg",
                )  # fmt: skip
                m_new = tl.maximum(m_all, lse_s)
                alpha = tl.math.exp2(m_all - m_new)
                w = tl.math.exp2(lse_s - m_new)
                w_sum = w_sum * alpha + w
                merged = merged * alpha[:, None] + o_s * w[:, None]
                m_all = m_new
            merged = merged / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
            tl.store(out_rows, merged.to(out_ptr.dtype.element_ty), mask=gd_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


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
        part_o = part_lse = cnt = out  # unused by the kernel in this mode
    else:
        if batch * num_kv_heads > MAX_SPLIT_TILES:
            raise ValueError(
                f"num_splits > 1 takes at most {MAX_SPLIT_TILES} (sequence, KV head) pairs, "
                f"got {batch * num_kv_heads}"
            )
        cnt = split_counters(query.device)
        part_o = torch.empty(
            batch, num_heads, num_splits, block_d, dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty(
            batch, num_heads, num_splits, dtype=torch.float32, device=query.device
        )
    quant = kv_scale is not None
    # H200 sweep (benchmarks/kv_attention.py, batch 64-512, 256-512 keys): quantized
    # tiles (V stored transposed) are best at 2 warps and 2 stages (1.25-1.35x faster
    # than the bf16 kernel), where the bf16 kernel is best at 4 warps and 2.
    default_warps, default_stages = (2, 2) if quant else (4, 2)
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
        cnt,
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
        num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages,
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
    a quantized cache is dequantized to float32 first): the context reference with one
    query row per sequence. Padding rows (``seq_len`` 0) attend to nothing and read 0,
    as the kernel writes them."""
    batch = seq_lens.shape[0]
    one_row_each = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
    out = context_attention_ref(
        query, kv_cache, one_row_each, seq_lens.clamp(min=1), block_tables, 1, scale, sliding_window, kv_scale
    )
    out[seq_lens == 0] = 0
    return out
