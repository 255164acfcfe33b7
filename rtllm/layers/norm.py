"""RMSNorm, optionally fused with the residual add that precedes it.

On CUDA (when Triton imports) the fused Triton kernel of :mod:`rtllm.kernels.rms_norm`
runs; elsewhere the PyTorch code below, whose numerics match Hugging Face's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rtllm.kernels import fused_kernel

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
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalize ``x``; with ``residual``, first add it and return ``(normed, sum)``."""
        kernel = self._kernel_for(x, residual)
        if kernel is not None:
            return kernel(x, self.weight, self.eps, residual)  # type: ignore[return-value]
        if residual is None:
            return self._norm(x)
        summed = x + residual
        return self._norm(summed), summed
