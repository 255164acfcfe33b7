"""GGUF Q8_0 / Q4_0 / Q4_1 blocks as rtllm groupwise weights (group 32), no dequantization.

A GGUF block holds 32 consecutive elements of a row (along the input dim) and an fp16
scale ``d`` (Q4_1 also an fp16 minimum ``m``):

=======  =====================================  ==========================================
type     block bytes                            rtllm tensors (``G = in / 32``)
=======  =====================================  ==========================================
Q8_0     ``d``, 32 x int8 ``q``                 ``weight`` int8 ``q``; ``weight_scale``
                                                ``d``: ``w = q * d``
Q4_0     ``d``, 16 bytes: element j in the low  ``weight`` uint8 ``q`` in [0, 16);
         nibble of byte j, j + 16 in the high   ``weight_zero`` int32 8: ``w = (q - 8) * d``
Q4_1     ``d``, ``m``, 16 bytes as Q4_0         ``weight_zero`` float32 ``-m / d``:
                                                ``w = (q + m / d) * d = q * d + m``
=======  =====================================  ==========================================

Scales are float32 ``[out, G]``. A Q4_1 block with ``d = 0`` (a constant block; llama.cpp
then writes ``q = 0``) gets scale 1 and zero ``-m`` so that it still dequantizes to
``m``. Q4_0's ``d`` may be negative (llama.cpp keeps the sign of the largest-magnitude
element); dequantization does not care.
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

#: GGUF types kept quantized by ``QuantConfig.from_gguf()``.
KEPT_TYPES = frozenset(
    {GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1}
)
GGUF_GROUP = 32


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start : start + 2].contiguous().view(torch.float16).squeeze(-1).float()


def gguf_to_groupwise(raw: torch.Tensor, qtype: int) -> dict[str, torch.Tensor]:
    """Convert one tensor's raw bytes ``[out, in / 32 * type_size]`` (uint8) to rtllm's
    groupwise tensors (see the module docstring), keyed by parameter suffix."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in KEPT_TYPES:
        raise ValueError(f"GGUF type {qtype.name} is not kept quantized (only Q8_0, Q4_0, Q4_1)")
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, type_size)
    d = _f16(blocks, 0)
    if qtype == GGMLQuantizationType.Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1)
        return {"weight": q, "weight_scale": d}
    qs = blocks[..., 4:] if qtype == GGMLQuantizationType.Q4_1 else blocks[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, -1)
    if qtype == GGMLQuantizationType.Q4_0:
        return {"weight": q, "weight_scale": d, "weight_zero": torch.full_like(d, 8, dtype=torch.int32)}
    m = _f16(blocks, 2)
    constant = d == 0
    scale = torch.where(constant, torch.ones_like(d), d)
    zero = torch.where(constant, -m, -m / scale)
    return {"weight": q, "weight_scale": scale, "weight_zero": zero}
