"""Kernel layout of weight-only quantized linear weights (int4 / int8 in int32 words).

Packed layout (:class:`PackedInt4Weight`, :class:`PackedInt8Weight`) of a linear layer
with ``N = out_features``, ``K = in_features``, ``bits`` 4 or 8, ``F = 32 // bits``
codes per int32 word and ``G = K / group_size`` groups (``G = 1``: per channel)::

    qweight  int32 [N, K / F]   row n holds output channel n's codes, packed along K
    scales   [G, N]             scale_dtype (float16 by default)
    zeros    [G, N]             scale_dtype, integer values in [0, 2**bits)
    w[n, k] = (q[n, k] - zeros[k // group_size, n]) * scales[k // group_size, n]

Words form blocks of 4 consecutive words covering ``4 * F`` input channels (32 for
int4, 16 for int8). Field ``j`` of word ``4*b + c`` (``c`` in 0..3) holds the code of
input channel ``k = 4*F*b + 4*j + c``: field ``j`` of a block's 4 words holds 4
consecutive channels. Field ``j`` is bits ``[bits*j, bits*(j+1))`` (bit 0 least
significant) of the word rotated right by ``rot`` (:data:`WORD_ROTATION`: 1 for int4,
5 for int8): stored words are rotated left by ``rot``, which saves one shift per word
in :func:`dequant_field`. E.g. int4 codes ``q[k] = k % 16`` for ``k`` in 0..31 pack
to ``0xC840C840, 0xD951D951, 0xEA62EA62, 0xFB73FB73`` before the rotation and
``0x90819081, 0xB2A3B2A3, 0xD4C5D4C5, 0xF6E7F6E7`` after (as int32, all negative).
Why: a thread loads one block (16 bytes, one vector load) and multiplies field ``j``
with 4 consecutive activations. Invariants: ``K % (4*F) == 0`` and ``group_size % (4*F) == 0``
(a block never straddles two groups); scales/zeros are ``[G, N]`` so that a group's
values for consecutive output channels are contiguous.

This is a runtime layout: the first CUDA forward packs a layer's internal-layout codes
(:mod:`rtllm.quantization.packing`) into it; checkpoints never hold it.

Dequantization (:func:`dequant_field`, shared by the GEMV and the tiled GEMM): the
float32 whose bits are ``magic | (q << P)`` with ``magic`` the bits of ``2**(23 - P)``
is exactly ``2**(23 - P) + q`` (one shift and one and-or per code, no int-to-float
conversion, which runs at a quarter of the FMA rate). A field is moved to ``P = 13``
(offset 1024) or, for even int4 fields, ``P = 17`` (offset 64), so that pairs of int4
fields share one shifted copy: 3 shift-like instructions per 8 codes instead of 8.
Kernels subtract ``offset + zero`` exactly (GEMM) or fold it into a per-block
correction of the float32 accumulator (GEMV, see :mod:`rtllm.kernels.quant_gemv`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

#: float32 bits of 1024.0 and 64.0: the magic numbers of fields moved to bit 13 / 17.
MAGIC_1024 = 0x44800000
MAGIC_64 = 0x42800000
#: Left rotation of packed words (int4: 1 bit, int8: 5 bits); see :func:`dequant_field`.
WORD_ROTATION = {4: 1, 8: 5}
#: int4 fields ``J`` with ``J % 2 == HIGH_PARITY`` dequantize at bit 17 (offset 64), the
#: others (and every int8 field) at bit 13 (offset 1024).
HIGH_PARITY = tl.constexpr(0)


@triton.jit
def dequant_field(w, mag_1024, mag_64, J: tl.constexpr, BITS: tl.constexpr):
    """Field ``J`` of int32 words ``w`` as float32 ``offset + q`` (exact, no I2F).

    Words are stored rotated left by :data:`WORD_ROTATION` bits, so field ``J`` sits
    at bit ``(BITS * J + rot) % 32``. A field is moved to bit 13 (offset 1024) or, for
    int4 fields of parity :data:`HIGH_PARITY`, bit 17 (offset 64): int4 fields 3 and 4
    are there already, fields (1, 2) and (5, 6) need one shift by 8 each, and fields
    (7, 0) one swap of the 16-bit halves (field 7 wraps around bit 31, hence the
    rotation): 3 shift-like instructions per 8 codes instead of 4 without it (int8:
    field 1 in place, 3 instructions per 4 codes). ptxas reuses a shifted copy for
    both fields of a pair. ``mag_1024`` / ``mag_64`` are :data:`MAGIC_1024` /
    :data:`MAGIC_64` passed as kernel arguments: in registers they let ptxas fuse the
    and-or into one LOP3 (an immediate would take LOP3's only immediate slot next to
    the mask, costing a second instruction per code).
    """
    HIGH: tl.constexpr = BITS == 4 and J % 2 == HIGH_PARITY
    POS: tl.constexpr = 17 if HIGH else 13
    ROT: tl.constexpr = 1 if BITS == 4 else 5
    SHIFT: tl.constexpr = POS - BITS * J - ROT
    MASK: tl.constexpr = ((1 << BITS) - 1) << POS
    if SHIFT == 16 or SHIFT == -16:
        # Swap the halves (one PRMT): also the only way to bring a wrapped field.
        u = w.to(tl.uint32, bitcast=True)
        v = ((u << 16) | (u >> 16)).to(tl.int32, bitcast=True)
    elif SHIFT >= 0:
        v = w << SHIFT
    else:
        # Arithmetic shift: the sign bits it drags in fall outside MASK.
        v = w >> -SHIFT
    if HIGH:  # noqa: SIM108 (constexpr branch)
        v = (v & MASK) | mag_64
    else:
        v = (v & MASK) | mag_1024
    return v.to(tl.float32, bitcast=True)


@triton.jit
def field_zero(z, J: tl.constexpr, BITS: tl.constexpr):
    """``z + offset`` of field ``J``: ``dequant_field(w, .., J, BITS) - field_zero(z, J,
    BITS)`` is exactly ``q - z`` in float32."""
    if BITS == 4 and J % 2 == HIGH_PARITY:  # noqa: SIM108 (constexpr branch)
        zc = z + 64.0
    else:
        zc = z + 1024.0
    return zc


# ---- packed weights ----------------------------------------------------------------------


@dataclass(frozen=True)
class PackedQuantWeight:
    """Kernel layout of a weight-only quantized ``[N, K]`` weight (module docstring)."""

    qweight: torch.Tensor  # int32 [N, K * bits / 32]
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor  # [G, N], integer values
    in_features: int
    out_features: int
    group_size: int  # == in_features for per-channel
    bits: int

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes a GEMM must read for the weight (codes, scales, zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def clone(self) -> PackedQuantWeight:
        """A copy in new memory (the tuner and benchmarks cycle through copies)."""
        return dataclasses.replace(
            self, qweight=self.qweight.clone(), scales=self.scales.clone(), zeros=self.zeros.clone()
        )

    def to(self, device: torch.device | str) -> PackedQuantWeight:
        return type(self)(
            self.qweight.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.in_features,
            self.out_features,
            self.group_size,
            self.bits,
        )


@dataclass(frozen=True)
class PackedInt4Weight(PackedQuantWeight):
    """4-bit codes, 8 per int32 word (``bits == 4``)."""


@dataclass(frozen=True)
class PackedInt8Weight(PackedQuantWeight):
    """8-bit codes, 4 per int32 word (``bits == 8``)."""


def _block_perm(in_features: int, bits: int) -> torch.Tensor:
    """Input channel of each packed slot: slot ``F*word + j`` holds channel ``perm[slot]``."""
    f = 32 // bits
    word = torch.arange(in_features // f).repeat_interleave(f)
    j = torch.arange(f).repeat(in_features // f)
    return (word // 4) * (4 * f) + 4 * j + word % 4


def _prepack(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bits: int,
    scale_dtype: torch.dtype,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    if codes.dim() != 2 or zeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("codes, zeros and scales must be 2-D ([out, in], [out, G], [out, G])")
    n, k = codes.shape
    f = 32 // bits
    group = k if group_size == -1 else group_size
    if group <= 0 or k % group != 0:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")
    if k % (4 * f) != 0 or group % (4 * f) != 0:
        raise ValueError(
            f"in_features ({k}) and group_size ({group}) must be multiples of {4 * f} "
            f"for {bits}-bit packing"
        )
    g = k // group
    if zeros.shape != (n, g) or scales.shape != (n, g):
        raise ValueError(
            f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must be [{n}, {g}]"
        )
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must be in [0, {1 << bits})")
    z = zeros.to(torch.int64)
    if z.numel() and (int(z.min()) < 0 or int(z.max()) >= 1 << bits):
        raise ValueError(f"zeros must be in [0, {1 << bits})")
    s = scales.float()
    if not torch.isfinite(s).all() or not torch.isfinite(s.to(scale_dtype)).all():
        raise ValueError(f"scales must be finite in {scale_dtype}")
    slots = c[:, _block_perm(k, bits).to(c.device)].reshape(n, k // f, f)
    shifts = torch.arange(f, device=c.device, dtype=torch.int64) * bits
    words = (slots << shifts).sum(-1)  # < 2**32: exact in int64
    rot = WORD_ROTATION[bits]
    words = ((words << rot) | (words >> (32 - rot))) & 0xFFFFFFFF
    # Reinterpret as two's complement int32 explicitly (out-of-range casts are undefined).
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    dev = codes.device if device is None else device
    return (
        words.contiguous().to(dev),
        s.t().contiguous().to(scale_dtype).to(dev),
        z.t().contiguous().to(scale_dtype).to(dev),
        group,
    )


def prepack_int4(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
) -> PackedInt4Weight:
    """Internal-layout int4 weights to the kernel layout (module docstring).

    Args:
        codes: uint8 ``[out, in]`` codes in ``[0, 16)``.
        zeros: integer ``[out, G]`` zero points in ``[0, 16)`` (symmetric: 8).
        scales: float ``[out, G]``.
        group_size: ``in / G``, or ``-1`` for per channel (``G = 1``); a multiple of 32.
        scale_dtype: storage dtype of scales and zeros. float16 (the default) keeps 11
            significant bits, so it adds < 2.5e-4 relative error per scale (scales below
            6.1e-5 become float16 subnormals and lose more); float32 stores them exactly
            at twice the bytes.
        device: where the packed tensors live (default: ``codes``'s device).
    """
    qw, s, z, group = _prepack(codes, zeros, scales, group_size, 4, scale_dtype, device)
    return PackedInt4Weight(qw, s, z, codes.shape[1], codes.shape[0], group, 4)


def prepack_int8(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int = -1,
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
) -> PackedInt8Weight:
    """Internal-layout int8 weights to the kernel layout; see :func:`prepack_int4`.

    ``codes`` uint8 ``[out, in]``, ``zeros`` ``[out, G]`` (symmetric per-channel int8
    from :func:`rtn.quantize_int8_per_channel`: ``codes = q + 128``, ``zeros = 128``);
    ``group_size`` a multiple of 16 or ``-1`` (per channel, the usual W8A16).
    """
    qw, s, z, group = _prepack(codes, zeros, scales, group_size, 8, scale_dtype, device)
    return PackedInt8Weight(qw, s, z, codes.shape[1], codes.shape[0], group, 8)


def unpack_codes(packed: PackedQuantWeight) -> torch.Tensor:
    """Inverse of the packing: uint8 codes ``[out, in]`` in input-channel order."""
    f = 32 // packed.bits
    w = packed.qweight.to(torch.int64) & 0xFFFFFFFF
    rot = WORD_ROTATION[packed.bits]
    w = ((w >> rot) | (w << (32 - rot))) & 0xFFFFFFFF
    shifts = torch.arange(f, device=w.device, dtype=torch.int64) * packed.bits
    slots = ((w.unsqueeze(-1) >> shifts) & ((1 << packed.bits) - 1)).reshape(w.shape[0], -1)
    codes = torch.empty_like(slots)
    codes[:, _block_perm(packed.in_features, packed.bits).to(w.device)] = slots
    return codes.to(torch.uint8)


def dequantize_packed(
    packed: PackedQuantWeight, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """PyTorch reference: the float ``[out, in]`` weight, ``(q - zero) * scale`` in float32
    with the packed (stored-dtype) scales and zeros, rounded once to ``dtype``."""
    q = unpack_codes(packed).float()
    g = packed.group_size
    z = packed.zeros.float().t().repeat_interleave(g, dim=1)
    s = packed.scales.float().t().repeat_interleave(g, dim=1)
    return ((q - z) * s).to(dtype)


dequantize_int4 = dequantize_packed
dequantize_int8 = dequantize_packed


def quant_linear_ref(
    x: torch.Tensor, packed: PackedQuantWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference of :func:`quant_linear`: dequantize to ``x``'s dtype (one rounding, as
    the GEMM kernel's ``tl.dot`` operands are), multiply in float32, round once."""
    w = dequantize_packed(packed, x.dtype).float()
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# ---- dequantization on the device ---------------------------------------------------------


@triton.jit
def _dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    num_blocks,
    group_blocks,
    mag_1024,
    mag_64,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,
):
    """``w[n, k] = (q - z) * s`` in ``w_ptr``'s dtype, input channels in natural order."""
    FIELDS: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    offs_c = tl.arange(0, 4)
    mask = (offs_n < N)[:, None, None] & (blk < num_blocks)[None, :, None]
    n3 = offs_n.to(tl.int64)[:, None, None]
    b3 = blk[None, :, None]
    w = tl.load(qw_ptr + n3 * (num_blocks * 4) + b3 * 4 + offs_c[None, None, :], mask=mask)
    g = (b3 // group_blocks) * N + offs_n[:, None, None]
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
    out = w_ptr + n3 * (num_blocks * 4 * FIELDS) + b3 * (4 * FIELDS) + offs_c[None, None, :]
    for j in tl.static_range(FIELDS):
        v = (dequant_field(w, mag_1024, mag_64, j, BITS) - field_zero(z, j, BITS)) * s
        tl.store(out + 4 * j, v.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_weight(packed: PackedQuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight in ``dtype`` (natural channel order), dequantized on the
    weight's device by a Triton kernel (``dequantize_packed`` is the PyTorch reference)."""
    n, k = packed.out_features, packed.in_features
    fields = 32 // packed.bits
    num_blocks = k // (4 * fields)
    w = torch.empty(n, k, dtype=dtype, device=packed.qweight.device)
    block_n, nb = 16, 32
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(num_blocks, nb))](
        packed.qweight,
        packed.scales,
        packed.zeros,
        w,
        n,
        num_blocks,
        packed.group_size // (4 * fields),
        MAGIC_1024,
        MAGIC_64,
        BITS=packed.bits,
        BLOCK_N=block_n,
        NB=nb,
        num_warps=4,
    )
    return w
