"""Quantized paged KV cache (INT8, FP8 E4M3): layout, scales and the PyTorch reference.

Pure PyTorch (no Triton import): the runner, the torch backend and memory planning use
it on any device; the Triton kernels implement the same arithmetic.

Design
------
A quantized layer cache is a :class:`QuantizedKVCache` pair:

* ``data``: ``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]`` in
  ``torch.int8`` or ``torch.float8_e4m3fn`` (1 byte/element). K codes (index 0) use
  that layout. **V codes (index 1) are stored transposed within each block**: the
  block's bytes are ``[num_kv_heads, head_dim, tokens_per_block]`` (tokens fastest;
  :func:`value_codes_by_head`). The attention kernels feed V to the tensor cores with
  the keys as the reduction axis, and 8-bit operands load efficiently only along
  their reduction axis (no 8-bit transposing shared-memory load on Hopper): with V
  transposed, V tiles load like K tiles (measured on an H200: FP8 decode attention
  213 -> 158 us at batch 512, ``benchmarks/RESULTS.md``). Block copies move whole
  blocks, so they do not care; :func:`code_rows` / :func:`store_code_rows` convert
  from / to logical ``[..., tokens_per_block, num_kv_heads, head_dim]`` rows.
* ``scale``: ``[2, num_blocks, tokens_per_block, num_kv_heads]`` float32, the
  dequantization scale of each (K or V, token, KV head) row.

Invariant: codes are never NaN. Blocks are zeroed before first use and every code is
written clamped, so attention may read the unused tail of a block unmasked (its
probability weight is 0, and 0 times a finite code is 0).

Scales are symmetric and dynamic, one per (token, KV head), computed when the token's
K/V is written: ``scale = amax(|x|) / QMAX`` over the row's ``head_dim`` values, with
``QMAX`` 127 (INT8) or 448 (the largest finite E4M3 value), and ``x ~= q * scale``.
A row of zeros gets scale 0 (and codes 0), so a zeroed block dequantizes to 0.

Why per (token, head) for FP8 too: a per-tensor scale would need calibration data
(the KV of future tokens is unknown when the cache is allocated) and one outlier
token or head would squeeze every other row into E4M3's few small-value codes. Per
row, each row uses the full code range; the cost is 4 bytes per (token, head) next to
``head_dim`` bytes of codes (about 6% for head_dim 64). Float32 scales keep tiny
``amax`` values representable (float16 would flush them to 0).

Rounding: INT8 rounds half away from zero (``trunc(y + 0.5 * sign(y))``) and clamps to
[-127, 127]; FP8 converts with round-to-nearest-even after clamping to [-448, 448].
Because the scale travels with its row, copying a block (copy-on-write, host tier)
must copy ``data`` and ``scale`` together: :func:`kv_cache_parts` lists both.

FP8 on CPU: PyTorch has no CPU ``index_copy_`` / ``index_select`` for float8 dtypes,
so the torch backend moves FP8 codes as ``uint8`` views (bit-exact) and converts with
``.to()``, which CPU PyTorch does support.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from rtllm.quantization.config import QuantConfig

#: Largest code magnitude per quantized KV dtype.
KV_QMAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
#: Element type of the per-(token, head) scales.
KV_SCALE_DTYPE = torch.float32


class QuantizedKVCache(NamedTuple):
    """One layer's quantized KV cache (see the module docstring for the layout)."""

    data: torch.Tensor  # [2, num_blocks, tokens_per_block, num_kv_heads, head_dim] int8/fp8
    scale: torch.Tensor  # [2, num_blocks, tokens_per_block, num_kv_heads] float32


#: One layer's cache as the runner hands it to attention: plain tensor or quantized pair.
KVCacheLayer = torch.Tensor | QuantizedKVCache


def is_quantized_kv_dtype(dtype: torch.dtype) -> bool:
    """True for the KV element types stored with scales (int8, float8_e4m3fn)."""
    return dtype in KV_QMAX


def kv_cache_dtype_of(quant_config: QuantConfig | None) -> torch.dtype | None:
    """The quantized KV element type ``quant_config`` asks for, or None (model dtype)."""
    if quant_config is None:
        return None
    mode = quant_config.quant_mode
    if mode.has_int8_kv_cache():
        return torch.int8
    if mode.has_fp8_kv_cache():
        return torch.float8_e4m3fn
    return None


def kv_bytes_per_token_layer_head(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K plus V (codes and scales) per (token, layer, KV head) for ``dtype``."""
    element = torch.empty((), dtype=dtype).element_size()
    scale = KV_SCALE_DTYPE.itemsize if is_quantized_kv_dtype(dtype) else 0
    return 2 * (head_dim * element + scale)


def allocate_kv_layer(
    num_blocks: int,
    tokens_per_block: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    zero: bool = False,
    pin_memory: bool = False,
) -> KVCacheLayer:
    """One layer's cache: a plain tensor, or a :class:`QuantizedKVCache` for int8/fp8."""
    shape = (2, num_blocks, tokens_per_block, num_kv_heads, head_dim)
    make = torch.zeros if zero else torch.empty
    data = make(shape, dtype=dtype, device=device, pin_memory=pin_memory)
    if not is_quantized_kv_dtype(dtype):
        return data
    scale = make(shape[:-1], dtype=KV_SCALE_DTYPE, device=device, pin_memory=pin_memory)
    return QuantizedKVCache(data, scale)


def kv_cache_parts(layer: KVCacheLayer) -> tuple[torch.Tensor, ...]:
    """The tensors of one layer's cache that block copies and zeroing must cover, as
    byte-movable views (float8 as uint8: CPU PyTorch cannot index float8)."""
    if isinstance(layer, QuantizedKVCache):
        return (raw_view(layer.data), layer.scale)
    return (layer,)


def raw_view(data: torch.Tensor) -> torch.Tensor:
    """``data`` viewed as uint8 when it is float8 (bit-exact moves on every device)."""
    return data.view(torch.uint8) if data.dtype == torch.float8_e4m3fn else data


def check_kv_scale(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> bool:
    """Validate ``kv_scale`` against ``kv_cache``; True when the cache is quantized."""
    quantized = is_quantized_kv_dtype(kv_cache.dtype)
    if not quantized:
        if kv_scale is not None:
            raise ValueError(f"kv_scale is only for int8/fp8 caches, the cache is {kv_cache.dtype}")
        return False
    if kv_scale is None:
        raise ValueError(f"a {kv_cache.dtype} kv_cache needs its kv_scale tensor")
    if kv_scale.shape != kv_cache.shape[:-1] or kv_scale.dtype != KV_SCALE_DTYPE:
        raise ValueError(
            f"kv_scale must be float32 {tuple(kv_cache.shape[:-1])}, got "
            f"{kv_scale.dtype} {tuple(kv_scale.shape)}"
        )
    if kv_scale.stride(-1) != 1 or kv_scale.device != kv_cache.device:
        raise ValueError("kv_scale must have a contiguous head dimension on the cache's device")
    return True


def value_codes_by_head(data: torch.Tensor) -> torch.Tensor:
    """The V codes of a quantized cache ``data`` as stored: a view ``[num_blocks,
    num_kv_heads, head_dim, tokens_per_block]`` (float8 as uint8, see :func:`raw_view`)."""
    _, num_blocks, tokens_per_block, num_kv_heads, head_dim = data.shape
    return raw_view(data)[1].view(num_blocks, num_kv_heads, head_dim, tokens_per_block)


def code_rows(data: torch.Tensor) -> torch.Tensor:
    """A quantized cache's codes as logical rows ``[2, num_blocks, tokens_per_block,
    num_kv_heads, head_dim]`` (a copy, ``data``'s dtype): V un-transposed."""
    rows = raw_view(data).clone()
    rows[1] = value_codes_by_head(data).permute(0, 3, 1, 2)
    return rows.view(data.dtype)


def store_quantized_rows(
    data: torch.Tensor, scale: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Quantize K/V rows ``[T, num_kv_heads, head_dim]`` and store codes and scales at
    cache ``slots`` (int64, ``block * tokens_per_block + offset``, none negative): the
    PyTorch counterpart of the write kernel (V codes transposed per block)."""
    tokens_per_block = data.shape[2]
    blocks, offsets = slots // tokens_per_block, slots % tokens_per_block
    k_codes, k_scale = quantize_kv(key, data.dtype)
    v_codes, v_scale = quantize_kv(value, data.dtype)
    raw_view(data)[0, blocks, offsets] = raw_view(k_codes)  # raw bytes: CPU cannot index fp8
    value_codes_by_head(data)[blocks, :, :, offsets] = raw_view(v_codes)
    scale[0, blocks, offsets] = k_scale
    scale[1, blocks, offsets] = v_scale


def store_code_rows(data: torch.Tensor, rows: torch.Tensor) -> None:
    """Write logical code rows ``[2, num_blocks, tokens_per_block, num_kv_heads,
    head_dim]`` (``data``'s dtype) into the cache ``data`` (V transposed per block)."""
    if rows.shape != data.shape or rows.dtype != data.dtype:
        raise ValueError(f"rows must be {data.dtype} {tuple(data.shape)}, got {rows.dtype} {tuple(rows.shape)}")
    raw, src = raw_view(data), raw_view(rows)
    raw[0].copy_(src[0])
    value_codes_by_head(data).copy_(src[1].permute(0, 2, 3, 1))


def quantize_kv_cache(x: torch.Tensor, dtype: torch.dtype) -> QuantizedKVCache:
    """A float cache ``x`` ``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]``
    quantized into the cache layout, exactly as the write kernels store each row."""
    codes, scale = quantize_kv(x, dtype)
    data = torch.empty_like(codes)
    store_code_rows(data, codes)
    return QuantizedKVCache(data, scale)


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows ``x`` ``[..., head_dim]`` to ``dtype`` codes and float32 scales ``[...]``."""
    qmax = KV_QMAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = amax / qmax
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    y = xf * inv[..., None]
    if dtype == torch.int8:
        codes = torch.trunc(y + torch.copysign(torch.full_like(y, 0.5), y)).clamp(-qmax, qmax)
        return codes.to(torch.int8), scale
    return y.clamp(-qmax, qmax).to(dtype), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes`` ``[..., head_dim]`` times ``scale`` ``[...]`` (float32 math) as ``dtype``."""
    return (codes.float() * scale[..., None]).to(dtype)


def dequantize_kv_cache(layer: QuantizedKVCache, dtype: torch.dtype) -> torch.Tensor:
    """The whole layer cache as logical rows dequantized to ``dtype`` (tests, references)."""
    return dequantize_kv(code_rows(layer.data), layer.scale, dtype)
