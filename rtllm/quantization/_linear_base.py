"""Shared pieces of the quantized linear layers: shapes, bias and argument checks."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.quantization.config import QuantAlgo, QuantConfig


def frozen(t: torch.Tensor) -> nn.Parameter:
    """A parameter that never takes gradients (integer and FP8 ones cannot anyway)."""
    return nn.Parameter(t, requires_grad=False)


def check_algo(cls: type, config: QuantConfig, allowed: tuple[QuantAlgo, ...]) -> None:
    """Raise ``ValueError`` unless ``config.quant_algo`` is one ``cls`` serves."""
    if config.quant_algo not in allowed:
        names = ", ".join(str(a) for a in allowed)
        raise ValueError(f"{cls.__name__} serves quant_algo {names}; got {config.quant_algo}")


def check_float_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ``weight`` is float ``[out, in]`` and ``bias`` ``[out]``."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


class QuantizedLinear(nn.Module):
    """Shapes and the bias shared by the quantized linear layers."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        if bias:
            self.bias = frozen(torch.zeros(out_features, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _copy_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias.data.copy_(bias)

    def _bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
