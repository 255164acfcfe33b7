"""RMSNorm, optionally fused with the residual add that precedes it.

On CUDA (when Triton imports) the fused Triton kernel of :mod:`rtllm.kernels.rms_norm`
runs; elsewhere the PyTorch code below, whose numerics match Hugging Face's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rtllm.kernels import fused_kernel
from rtllm.quantization.rtn import Fp8Tokens

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)




class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like Hugging Face's ``LlamaRMSNorm``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def _kernel_for(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> Callable[..., object] | None:
        if not x.is_cuda or x.dim() not in (2, 3) or x.dtype not in _KERNEL_DTYPES:
            return None
        if self.weight.dtype not in _KERNEL_DTYPES or x.stride(-1) != 1 or x.shape[-1] > 65536:
            return None
        if residual is not None and (
            residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1
        ):
            return None
        return fused_kernel("rms_norm", "rms_norm")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8_out: bool = False
    ) -> Any:
        """Normalize ``x``; with ``residual``, first add it and return ``(normed, sum)``.

        With ``fp8_out`` (for a following FP8 linear, :class:`Fp8Tokens`) ``normed`` comes
        quantized per token; the CUDA kernel fuses the quantization.
        """
        kernel = self._kernel_for(x, residual)
        if kernel is not None and (not fp8_out or x.dim() == 2):
            return kernel(x, self.weight, self.eps, residual, fp8_out=fp8_out)
        if residual is None:
            return _maybe_fp8(self._norm(x), fp8_out)
        summed = x + residual
        return _maybe_fp8(self._norm(summed), fp8_out), summed


def _maybe_fp8(x: torch.Tensor, fp8_out: bool) -> torch.Tensor | Fp8Tokens:
    return Fp8Tokens.quantize(x) if fp8_out else x
