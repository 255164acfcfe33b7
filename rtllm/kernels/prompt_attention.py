"""Attention of fresh prompts over their own 16-bit K/V (Triton), for quantized caches.

A prompt with no cached prefix attends only to keys computed in the same step. Their
K/V are still at hand in the model dtype, so over a quantized cache (int8 / FP8 codes,
:mod:`rtllm.kernels.kv_quant`) the step attends over those rather than over the codes
it has just written: the 16-bit tiles go straight to the tensor cores (the code tiles
convert in registers: about half the speed on an H200, ``benchmarks/kv_attention.py``)
and the prompt's own attention is exact. TensorRT-LLM's context FMHA and vLLM's prefill
treat a quantized cache the same way. The cache is still written for later steps
(decode, later chunks, prefix hits), whose attention reads the codes.

It is the paged context kernel of :mod:`rtllm.kernels.context_attention` with one-token
"blocks": token ``t`` of the packed step is block ``t``, and sequence ``b``'s table is
``cu_seqlens_q[b] + [0, 1, ...]`` (:func:`prompt_token_tables`, once per step).
"""

from __future__ import annotations

import torch

from rtllm.kernels.context_attention import launch_context_kernel


def prompt_token_tables(cu_seqlens_q: torch.Tensor, max_query_len: int) -> torch.Tensor:
    """int32 ``[batch, max_query_len]`` tables of packed token indices: row ``b`` is
    ``cu_seqlens_q[b] + arange(max_query_len)``, clamped to the last token (entries past a
    sequence's length are never read)."""
    offsets = torch.arange(max_query_len, dtype=torch.int32, device=cu_seqlens_q.device)
    tables = cu_seqlens_q[:-1, None] + offsets[None, :]
    return torch.minimum(tables, cu_seqlens_q[-1:] - 1).to(torch.int32)


def prompt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    token_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    **tiles: int,
) -> torch.Tensor:
    """Causal attention of packed prompts that have no cached prefix, over their own K/V.

    Args:
        query: ``[num_tokens, num_heads, head_dim]`` (token/head strides free).
        key, value: ``[num_tokens, num_kv_heads, head_dim]`` in ``query``'s dtype, with
            equal head strides and contiguous head_dim (token strides may differ: ``value``
            is often a view of the fused QKV output).
        cu_seqlens_q: int32 ``[batch + 1]`` row offsets.
        seq_lens: int32 ``[batch]``, ``cu[b + 1] - cu[b]``: each prompt's keys are
            exactly its own rows.
        token_tables: :func:`prompt_token_tables` of ``cu_seqlens_q``.
        max_query_len: host int, the longest prompt.
        scale: softmax scale.
        sliding_window: attend to at most this many keys (the query's own included).
        out: optional ``[num_tokens, num_heads, head_dim]`` output buffer.
        tiles: ``block_m`` / ``block_n`` / ``num_warps`` / ``num_stages`` overrides, as
            :func:`rtllm.kernels.context_attention.context_attention` takes them.

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in ``query``'s dtype.
    """
    if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
        raise ValueError("query must be [T, H, D]; key and value [T, Hkv, D] of one shape")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"key/value dtype must be the query's {query.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or key.stride(1) != value.stride(1):
        raise ValueError("key and value need contiguous head_dim and equal head strides")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"num_heads {query.shape[1]} is not a multiple of {key.shape[1]}")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if query.shape[0] == 0 or max_query_len <= 0:
        return out
    return launch_context_kernel(
        query, key.unsqueeze(1), value.unsqueeze(1), None, out, cu_seqlens_q, seq_lens,
        token_tables, max_query_len, scale, sliding_window, query.shape[1] // key.shape[1],
        **tiles,
    )  # fmt: skip
