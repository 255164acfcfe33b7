"""Packing of low-bit integers into int32 words, and the AWQ and GPTQ checkpoint layouts.

rtllm's internal layout (what :mod:`rtllm.quantization.rtn` produces with a zero point
and what the weight-only linear layers hold), with ``G = in / group_size``::

    q      uint8   [out, in]   unsigned codes in [0, 2**bits)
    zeros  int32   [out, G]    integer zero points: w = (q - zero) * scale
    scales float   [out, G]

Word packing (:func:`pack_int32`): ``n = 32 // bits`` consecutive elements along one
dim share an int32 word. Bit field ``i`` of a word is bits ``[i*bits, (i+1)*bits)``
(bit 0 the least significant) and holds element ``order[i]`` of its run of ``n``.
Words are stored as int32 two's complement, so a word whose top field is >= 8 (4-bit)
is negative.

AWQ "GEMM" layout (AutoAWQ ``version="gemm"``, 4 bits, always with zero points)::

    qweight int32 [in, out/8]   q transposed, packed along the output dim
    qzeros  int32 [G, out/8]    zeros transposed, packed along the output dim
    scales  fp16  [G, out]      scales transposed
    order   (0, 2, 4, 6, 1, 3, 5, 7): field i holds output column 8*c + order[i] of word c
    w[o, i] = (q[o, i] - zeros[o, i // group]) * scales[o, i // group]

  e.g. columns 0..7 holding codes 0..7 pack to the word 0x75316420.

GPTQ layout (AutoGPTQ / HF ``checkpoint_format="gptq"``, 4 or 8 bits, ``n = 32/bits``)::

    qweight int32 [in/n, out]   q transposed, packed along the *input* dim in order:
                                field j of word r holds input row n*r + j
    qzeros  int32 [G, out/n]    (zeros - 1) transposed, packed along the output dim in
                                order; the "- 1" is GPTQ v1's historical offset
                                (``zero_offset=1``; v2 checkpoints use 0)
    scales  fp16  [G, out]      scales transposed
    g_idx   int32 [in]          group of each input row: i // group_size (act-order
                                checkpoints permute it; those are rejected)
    w[o, i] = (q[o, i] - zeros[o, g_idx[i]]) * scales[o, g_idx[i]]

  e.g. input rows 0..7 holding codes 0..7 pack to 0x76543210; zeros 1..8 to 0x76543210.
  Symmetric GPTQ stores zero 2**(bits-1) for every group (stored value 7 for 4 bits).
  With the v1 offset a zero of 0 cannot be stored: :func:`pack_gptq` rejects it and
  :func:`unpack_gptq` reads stored + 1 without wrapping (zeros in [1, 2**bits]), which
  is what v1 kernels compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_WORD = 1 << 32


class GroupwiseWeights(NamedTuple):
    """Integer weights in rtllm's internal layout (see the module docstring)."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor


class AwqTensors(NamedTuple):
    """An AWQ GEMM checkpoint's tensors for one linear layer."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor


class GptqTensors(NamedTuple):
    """A GPTQ checkpoint's tensors for one linear layer."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def _fields_per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    return 32 // bits


def _check_order(order: Sequence[int] | None, n: int) -> list[int]:
    if order is None:
        return list(range(n))
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}, got {tuple(order)}")
    return list(order)


def pack_int32(
    values: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None
) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers into int32 words along ``dim``.

    Field ``i`` (bits ``[i*bits, (i+1)*bits)``) of each word holds element ``order[i]``
    of its run of ``32 // bits`` consecutive elements; ``order=None`` is sequential.
    ``values.shape[dim]`` must be a multiple of ``32 // bits``; the result has that dim
    divided by ``32 // bits``.
    """
    n = _fields_per_word(bits)
    perm = _check_order(order, n)
    v = values.movedim(dim, -1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must be in [0, {1 << bits}) to pack into {bits} bits")
    size = v.shape[-1]
    if size % n != 0:
        raise ValueError(f"dim {dim} has size {size}, not a multiple of {n}")
    v = v.reshape(*v.shape[:-1], size // n, n)[..., perm]
    shifts = torch.arange(n, dtype=torch.int64) * bits
    words = (v << shifts).sum(dim=-1)  # < 2**32, exact in int64
    # Reinterpret as two's complement int32 explicitly; out-of-range casts are not defined.
    words = torch.where(words >= _WORD // 2, words - _WORD, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack_int32(
    packed: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words to unsigned integers (int32 tensor)."""
    n = _fields_per_word(bits)
    perm = _check_order(order, n)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32, got {packed.dtype}")
    w = packed.movedim(dim, -1).to(torch.int64) & (_WORD - 1)
    shifts = torch.arange(n, dtype=torch.int64) * bits
    fields = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    inverse = [0] * n
    for field, element in enumerate(perm):
        inverse[element] = field
    values = fields[..., inverse].reshape(*w.shape[:-1], w.shape[-1] * n)
    return values.to(torch.int32).movedim(-1, dim)


def _check_internal(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> int:
    """Validate internal-layout shapes; return the number of groups."""
    if q.dim() != 2 or zeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("q, zeros and scales must be 2-D ([out, in], [out, G], [out, G])")
    out_features, in_features = q.shape
    if zeros.shape != scales.shape or zeros.shape[0] != out_features:
        raise ValueError(
            f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be "
            f"[{out_features}, G]"
        )
    num_groups = scales.shape[1]
    if num_groups == 0 or in_features % num_groups != 0:
        raise ValueError(f"{num_groups} groups do not divide in_features {in_features}")
    return num_groups


def pack_awq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> AwqTensors:
    """Internal 4-bit ``(q [out, in], zeros [out, G], scales [out, G])`` to AWQ GEMM
    tensors ``(qweight [in, out/8], qzeros [G, out/8], scales fp16 [G, out])``."""
    _check_internal(q, zeros, scales)
    return AwqTensors(
        qweight=pack_int32(q.t(), 4, dim=1, order=AWQ_ORDER),
        qzeros=pack_int32(zeros.t(), 4, dim=1, order=AWQ_ORDER),
        scales=scales.t().to(torch.float16).contiguous(),
    )


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> GroupwiseWeights:
    """AWQ GEMM tensors to the internal layout: ``q uint8 [out, in]``, ``zeros int32
    [out, G]`` and ``scales [out, G]`` (the checkpoint's dtype)."""
    in_features, words = qweight.shape
    num_groups, out_features = scales.shape
    if words * 8 != out_features or qzeros.shape != (num_groups, words):
        raise ValueError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros "
            f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
        )
    if in_features % num_groups != 0:
        raise ValueError(f"{num_groups} groups do not divide in_features {in_features}")
    q = unpack_int32(qweight, 4, dim=1, order=AWQ_ORDER).t().to(torch.uint8).contiguous()
    zeros = unpack_int32(qzeros, 4, dim=1, order=AWQ_ORDER).t().contiguous()
    return GroupwiseWeights(q, zeros, scales.t().contiguous())


def pack_gptq(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int = 4,
    zero_offset: int = 1,
) -> GptqTensors:
    """Internal ``(q [out, in], zeros [out, G], scales [out, G])`` to GPTQ tensors.

    ``zero_offset`` is subtracted from the zeros before packing: 1 for v1
    (``checkpoint_format="gptq"``), 0 for v2. Returns ``(qweight [in*bits/32, out],
    qzeros [G, out*bits/32], scales fp16 [G, out], g_idx int32 [in])``.
    """
    if bits not in (4, 8):
        raise ValueError(f"GPTQ bits must be 4 or 8, got {bits}")
    num_groups = _check_internal(q, zeros, scales)
    stored = zeros.to(torch.int64) - zero_offset
    if stored.numel() and (int(stored.min()) < 0 or int(stored.max()) >= 1 << bits):
        raise ValueError(
            f"zeros must be in [{zero_offset}, {(1 << bits) - 1 + zero_offset}] to store "
            f"zero - {zero_offset} in {bits} bits"
        )
    in_features = q.shape[1]
    group_size = in_features // num_groups
    return GptqTensors(
        qweight=pack_int32(q.t(), bits, dim=0),
        qzeros=pack_int32(stored.t(), bits, dim=1),
        scales=scales.t().to(torch.float16).contiguous(),
        g_idx=torch.arange(in_features, dtype=torch.int32) // group_size,
    )


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    zero_offset: int = 1,
) -> GroupwiseWeights:
    """GPTQ tensors to the internal layout (``zeros = stored + zero_offset``).

    Raises:
        NotImplementedError: ``g_idx`` is not ``i // group_size`` (act-order).
    """
    n = _fields_per_word(bits)
    num_groups, out_features = scales.shape
    in_features = qweight.shape[0] * n
    if qweight.shape[1] != out_features or qzeros.shape != (num_groups, out_features // n):
        raise ValueError(
            f"GPTQ shapes disagree for {bits} bits: qweight {tuple(qweight.shape)}, qzeros "
            f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
        )
    if in_features % num_groups != 0:
        raise ValueError(f"{num_groups} groups do not divide in_features {in_features}")
    if g_idx is not None:
        expected = torch.arange(in_features, dtype=torch.int64) // (in_features // num_groups)
        if g_idx.shape != (in_features,) or not torch.equal(g_idx.to(torch.int64), expected):
            raise NotImplementedError(
                "GPTQ g_idx is not i // group_size (act-order / desc_act checkpoint); "
                "rtllm supports only desc_act=False"
            )
    q = unpack_int32(qweight, bits, dim=0).t().to(torch.uint8).contiguous()
    zeros = (unpack_int32(qzeros, bits, dim=1) + zero_offset).t().contiguous()
    return GroupwiseWeights(q, zeros, scales.t().contiguous())
