"""What the paged attention kernels share outside Triton: the check of their inputs and
the float32 PyTorch references the tests compare them with.

Layouts: ``query`` ``[num_tokens, num_heads, head_dim]``; ``kv_cache`` ``[2, num_blocks,
tokens_per_block, num_kv_heads, head_dim]`` (K at 0, V at 1), 16-bit or, with a float32
``kv_scale``, int8 / float8_e4m3fn codes (:mod:`rtllm.kernels.kv_quant`); sequence ``b``'s
token ``i`` in block ``block_tables[b, i // tokens_per_block]``.
"""

from __future__ import annotations

import math

import torch

from rtllm.kernels.kv_quant import check_kv_scale, code_rows, dequantize_kv, raw_view


def check_paged_inputs(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Validate the arguments shared by the attention launchers (``kv_scale``: required
    for, and only for, an int8 / float8_e4m3fn cache, whose query may be any float type).

    Returns ``(num_heads, num_kv_heads, head_dim, group)``.
    """
    if query.dim() != 3 or query.stride(-1) != 1:
        raise ValueError("query must be [num_tokens, num_heads, head_dim] with contiguous head_dim")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.stride(-1) != 1:
        raise ValueError(
            "kv_cache must be [2, num_blocks, tokens_per_block, num_kv_heads, head_dim] "
            "with contiguous head_dim"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {kv_cache.shape[4]}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if not check_kv_scale(kv_cache, kv_scale) and query.dtype != kv_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} != kv_cache dtype {kv_cache.dtype}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {query.dtype}")
    for name, t in (("seq_lens", seq_lens), ("block_tables", block_tables)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != query.device or kv_cache.device != query.device:
            raise ValueError("query, kv_cache and metadata must be on one device")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be [batch, max_blocks] with contiguous rows")
    if seq_lens.dim() != 1 or not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be a contiguous [batch] tensor")
    if block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("block_tables and seq_lens disagree on the batch size")
    return num_heads, num_kv_heads, head_dim, num_heads // num_kv_heads


def gather_paged_kv(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[seq_len, num_kv_heads, head_dim]`` of one sequence (reference helper);
    a quantized cache's rows are dequantized to float32 with their ``kv_scale``."""
    tokens_per_block = kv_cache.shape[2]
    positions = torch.arange(seq_len, device=kv_cache.device)
    blocks = block_table.long()[positions // tokens_per_block]
    offsets = positions % tokens_per_block
    if kv_scale is None:
        return kv_cache[0, blocks, offsets], kv_cache[1, blocks, offsets]
    codes = raw_view(code_rows(kv_cache))[:, blocks, offsets].view(kv_cache.dtype)  # CPU: no fp8 indexing
    kv = dequantize_kv(codes, kv_scale[:, blocks, offsets], torch.float32)
    return kv[0], kv[1]


def reference_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Float32 causal GQA attention of one sequence: ``query`` ``[q, H, D]`` at positions
    ``context_len..``, ``keys``/``values`` ``[context_len + q, Hkv, D]``."""
    q_len, num_heads, _ = query.shape
    group = num_heads // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), k) * scale
    q_pos = context_len + torch.arange(q_len, device=query.device)[:, None]
    k_pos = torch.arange(keys.shape[0], device=query.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def context_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`context_attention` (float32 math, ``query``'s dtype out;
    a quantized cache is dequantized to float32 first)."""
    check_paged_inputs(query, kv_cache, seq_lens, block_tables, kv_scale)
    out = torch.empty_like(query)
    cu = cu_seqlens_q.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q = query[cu[b] : cu[b + 1]]
        if q.shape[0] == 0:
            continue
        keys, values = gather_paged_kv(kv_cache, block_tables[b], seq_len, kv_scale)
        ctx = seq_len - q.shape[0]
        out[cu[b] : cu[b + 1]] = reference_attention(
            q, keys, values, ctx, scale, sliding_window
        ).to(query.dtype)
    return out
