"""Activation functions of gated MLPs.

On CUDA (when Triton imports) :class:`SiluAndMul` runs the Triton kernel of
:mod:`rtllm.kernels.silu_and_mul` (float32 math, one rounding); elsewhere the PyTorch
code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtllm.kernels import fused_kernel
from rtllm.quantization.rtn import Fp8Tokens

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)




class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a fused ``[..., 2 * d]`` gate/up input."""

    def forward(self, x: torch.Tensor, fp8_out: bool = False) -> torch.Tensor | Fp8Tokens:
        """With ``fp8_out`` (for a following FP8 linear) the result comes quantized per
        token (:class:`Fp8Tokens`); the CUDA kernel fuses the quantization."""
        if x.is_cuda and x.dim() == 2 and x.dtype in _KERNEL_DTYPES and x.stride(-1) == 1:
            kernel = fused_kernel("silu_and_mul", "silu_and_mul_fp8" if fp8_out else "silu_and_mul")
            if kernel is not None:
                return kernel(x)
        gate, up = x.chunk(2, dim=-1)
        out = F.silu(gate) * up
        return Fp8Tokens.quantize(out) if fp8_out else out
