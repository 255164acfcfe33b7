"""Rotary position embedding on q and k in one launch (Triton), plus a PyTorch reference.

Hugging Face's rotate-half layout: with ``x = [x1, x2]`` split at ``head_dim / 2``,
``out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]``, where ``cos``/``sin`` are rows
``positions[t]`` of caches ``[max_position, head_dim / 2]`` (float32 in
:class:`rtllm.layers.rotary.RotaryEmbedding`). The kernel computes in float32 and
rounds once to the output dtype; the layer's PyTorch path (like HF) first casts
``cos``/``sin`` to the activation dtype and rounds after every operation, so 16-bit
results may differ from it by a few ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    token,
    head0,
    stride_st,
    stride_sh,
    stride_dt,
    stride_dh,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads < NUM_HEADS)[:, None] & (cols < HALF)[None, :]
    src = src_ptr + token * stride_st + heads[:, None] * stride_sh + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    dst = dst_ptr + token * stride_dt + heads[:, None] * stride_dh + cols[None, :]
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, o1.to(out_ty), mask=mask)
    tl.store(dst + HALF, o2.to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cos,
    stride_sin,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    # Program (t, j): token t; head block j of q, or block j - (q's block count) of k.
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cs_mask = cols < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + cols, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + cols, mask=cs_mask, other=0.0).to(tl.float32)
    q_blocks: tl.constexpr = (NUM_Q_HEADS + BLOCK_H - 1) // BLOCK_H
    if block < q_blocks:
        _rotate_heads(
            q_ptr, q_out_ptr, token, block * BLOCK_H,
            stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin,
            NUM_Q_HEADS, HALF, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip
    else:
        _rotate_heads(
            k_ptr, k_out_ptr, token, (block - q_blocks) * BLOCK_H,
            stride_kt, stride_kh, stride_kot, stride_koh, cos, sin,
            NUM_K_HEADS, HALF, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip


def _check_inputs(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> None:
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(
            f"query and key must be [T, H, D] and [T, Hkv, D], "
            f"got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    tokens, _, head_dim = query.shape
    if key.shape[0] != tokens or key.shape[2] != head_dim:
        raise ValueError(f"key must be [{tokens}, Hkv, {head_dim}], got {tuple(key.shape)}")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if query.dtype not in _SUPPORTED or key.dtype != query.dtype:
        raise ValueError(
            f"query and key must share a float16/bfloat16/float32 dtype, "
            f"got {query.dtype} and {key.dtype}"
        )
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("query's and key's head_dim must be contiguous (stride 1)")
    if positions.dim() != 1 or positions.shape[0] != tokens:
        raise ValueError(f"positions must be [{tokens}], got {tuple(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    for name, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if cache.dim() != 2 or cache.shape[1] != head_dim // 2:
            raise ValueError(
                f"{name} must be [max_position, {head_dim // 2}], got {tuple(cache.shape)}"
            )
        if cache.dtype not in _SUPPORTED or cache.stride(-1) != 1:
            raise ValueError(f"{name} must be a float tensor with a contiguous last dim")
    for name, t in (
        ("key", key),
        ("positions", positions),
        ("cos_cache", cos_cache),
        ("sin_cache", sin_cache),
    ):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, query on {query.device}")


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` and ``key`` at ``positions`` with one kernel launch.

    Args:
        positions: int32/int64 ``[T]``, each in ``[0, max_position)`` (not checked:
            checking would synchronise with the host).
        query: ``[T, H, D]``; key: ``[T, Hkv, D]``, same dtype (float16/bfloat16/float32).
            Token and head strides are free (views into a fused QKV buffer work);
            head_dim must be contiguous.
        cos_cache, sin_cache: ``[max_position, D / 2]`` (float32 in the layer).
        inplace: rotate ``query`` and ``key`` in place instead of into new tensors.

    Returns:
        ``(query_rotated, key_rotated)``: the inputs themselves when ``inplace``,
        else new contiguous tensors.
    """
    _check_inputs(positions, query, key, cos_cache, sin_cache)
    if inplace:
        q_out, k_out = query, key
    else:
        q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    tokens, num_q_heads, head_dim = query.shape
    num_k_heads = key.shape[1]
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    max_heads = max(num_q_heads, num_k_heads, 1)
    block_h = max(1, min(triton.next_power_of_2(max_heads), 512 // block_half))
    grid = (tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h))
    pdl = use_pdl(query.device)
    _rotary_kernel[grid](
        query,
        key,
        q_out,
        k_out,
        positions,
        cos_cache,
        sin_cache,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos_cache.stride(0),
        sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        USE_PDL=pdl,
        num_warps=max(1, min(4, block_h * block_half // 256)),
        launch_pdl=pdl,
    )
    return q_out, k_out


def rotary_embedding_ref(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`rotary_embedding` (float32 math, one rounding)."""
    index = positions.long()
    cos = cos_cache.index_select(0, index).float().unsqueeze(1)
    sin = sin_cache.index_select(0, index).float().unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(query), rotate(key)
