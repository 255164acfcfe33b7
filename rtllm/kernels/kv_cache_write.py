"""Write a step's new K/V into the paged KV cache (Triton), plus a PyTorch reference.

Cache layout (see :mod:`rtllm.layers.attention_backends.base`): one tensor per layer
``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]``, K at index 0 and V at
index 1. Token ``t`` goes to slot ``slot_mapping[t]`` = ``block * tokens_per_block +
offset``; a negative slot means "skip this row" (padding rows of a CUDA-graph batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.kv_quant import (
    KV_QMAX,
    check_kv_scale,
    store_quantized_rows,
)
from rtllm.kernels.pdl import allow_dependents, use_pdl, wait_for_producers


@triton.jit
def _kv_cache_write_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    # One program copies one (token, kv head) row of K and of V.
    token = tl.program_id(0)
    head = tl.program_id(1)
    # int64: slot * stride overflows int32 for caches beyond 2 GiB elements.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    # A negative slot is a padded row: nothing is loaded or stored for it.
    mask = (offs_d < HEAD_DIM) & (slot >= 0)
    block = slot // TOKENS_PER_BLOCK
    offset = slot % TOKENS_PER_BLOCK
    dst = block * stride_c_block + offset * stride_c_tok + head * stride_c_head + offs_d
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_kt + head * stride_kh + offs_d, mask=mask)
    v = tl.load(value_ptr + token64 * stride_vt + head * stride_vh + offs_d, mask=mask)
    elem_ty = cache_ptr.dtype.element_ty
    tl.store(cache_ptr + dst, k.to(elem_ty), mask=mask)
    tl.store(cache_ptr + stride_c_kv + dst, v.to(elem_ty), mask=mask)


@triton.jit
def _quantize_row(x, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    """Codes and scale of one row ``x`` (float32, masked lanes 0): see kv_quant."""
    amax = tl.max(tl.abs(x), 0)
    # (The inner where keeps the unused branch finite: no division by zero.)
    inv = tl.where(amax > 0.0, QMAX / tl.where(amax > 0.0, amax, 1.0), 0.0)
    y = tl.minimum(tl.maximum(x * inv, -QMAX), QMAX)
    if IS_INT8:
        # Round half away from zero; the int conversion then truncates exactly.
        y = y + tl.where(y >= 0.0, 0.5, -0.5)
    return y, amax / QMAX


@triton.jit
def _kv_cache_write_quant_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    scale_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    stride_s_kv,
    stride_s_block,
    stride_s_tok,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    QMAX: tl.constexpr,
    IS_INT8: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_producers(USE_PDL)
    allow_dependents(USE_PDL)
    # One program quantizes one (token, kv head) row of K and of V; the scale tensor's
    # head stride is 1 (checked by the launcher).
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_d < HEAD_DIM) & (slot >= 0)
    block = slot // TOKENS_PER_BLOCK
    offset = slot % TOKENS_PER_BLOCK
    dst = block * stride_c_block + offset * stride_c_tok + head * stride_c_head + offs_d
    # V codes are stored transposed per block: [num_kv_heads, head_dim, tokens] (kv_quant).
    v_dst = block * stride_c_block + (head * HEAD_DIM + offs_d) * TOKENS_PER_BLOCK + offset
    sdst = block * stride_s_block + offset * stride_s_tok + head
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_kt + head * stride_kh + offs_d, mask=mask, other=0.0)
    v = tl.load(value_ptr + token64 * stride_vt + head * stride_vh + offs_d, mask=mask, other=0.0)
    kq, k_scale = _quantize_row(k.to(tl.float32), QMAX, IS_INT8)
    vq, v_scale = _quantize_row(v.to(tl.float32), QMAX, IS_INT8)
    elem_ty = cache_ptr.dtype.element_ty
    tl.store(cache_ptr + dst, kq.to(elem_ty), mask=mask)
    tl.store(cache_ptr + stride_c_kv + v_dst, vq.to(elem_ty), mask=mask)
    tl.store(scale_ptr + sdst, k_scale, mask=slot >= 0)
    tl.store(scale_ptr + stride_s_kv + sdst, v_scale, mask=slot >= 0)


def _check_kv_inputs(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, tokens_per_block, num_kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or t.shape[1:] != (heads, head_dim):
            raise ValueError(
                f"{name} must be [num_tokens, {heads}, {head_dim}], got {tuple(t.shape)}"
            )
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s head_dim must be contiguous (stride 1)")
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device}, kv_cache on {kv_cache.device}")
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key has {key.shape[0]} tokens, value {value.shape[0]}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's head_dim must be contiguous (stride 1)")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if not slot_mapping.is_contiguous() or slot_mapping.device != kv_cache.device:
        raise ValueError("slot_mapping must be contiguous and on the cache's device")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Store ``key``/``value`` rows into ``kv_cache`` at ``slot_mapping`` (in place).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``; token and head strides
            are free (views into a fused QKV buffer work), head_dim must be contiguous.
            Cast to the cache's dtype on store.
        kv_cache: ``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]``.
        slot_mapping: int32/int64 ``[num_tokens]``; negative entries are skipped.
        kv_scale: float32 ``[2, num_blocks, tokens_per_block, num_kv_heads]``, required
            for (and only for) an int8 / float8_e4m3fn cache: rows are quantized with a
            fresh per-(token, head) scale written here.
    """
    _check_kv_inputs(key, value, kv_cache, slot_mapping)
    quantized = check_kv_scale(kv_cache, kv_scale)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    grid = (num_tokens, num_kv_heads)
    pdl = use_pdl(key.device)
    if quantized:
        _kv_cache_write_quant_kernel[grid](
            key,
            value,
            kv_cache,
            kv_scale,
            slot_mapping,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            kv_cache.stride(0),
            kv_cache.stride(1),
            kv_cache.stride(2),
            kv_cache.stride(3),
            kv_scale.stride(0),
            kv_scale.stride(1),
            kv_scale.stride(2),
            HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim),
            TOKENS_PER_BLOCK=kv_cache.shape[2],
            QMAX=KV_QMAX[kv_cache.dtype],
            IS_INT8=kv_cache.dtype == torch.int8,
            USE_PDL=pdl,
            num_warps=1 if head_dim <= 64 else 2,
            launch_pdl=pdl,
        )
        return
    _kv_cache_write_kernel[grid](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        TOKENS_PER_BLOCK=kv_cache.shape[2],
        USE_PDL=pdl,
        num_warps=1 if head_dim <= 64 else 2,
        launch_pdl=pdl,
    )


def write_kv_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """PyTorch reference of :func:`write_kv_cache` (same arguments, same effect)."""
    _check_kv_inputs(key, value, kv_cache, slot_mapping)
    quantized = check_kv_scale(kv_cache, kv_scale)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if quantized:
        store_quantized_rows(kv_cache, kv_scale, key[keep], value[keep], slots)
        return
    tokens_per_block = kv_cache.shape[2]
    blocks, offsets = slots // tokens_per_block, slots % tokens_per_block
    kv_cache[0, blocks, offsets] = key[keep].to(kv_cache.dtype)
    kv_cache[1, blocks, offsets] = value[keep].to(kv_cache.dtype)
