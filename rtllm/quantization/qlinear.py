"""Quantized linear layers with CPU reference forward passes (correct, not fast).

Each layer is built empty with its shapes (so a model can be built, then loaded) or
from a float weight with ``from_float(weight, bias, config)``. Parameter names follow
Hugging Face / vLLM checkpoints: ``weight`` (quantized codes), ``weight_scale``,
``weight_zero``, ``input_scale``, ``pre_quant_scale``, ``bias``; all are frozen
``nn.Parameter``\\ s so ``model.named_parameters()`` (the loader's view) lists them.

Reference semantics, shared with the future GPU kernels:

* weight-only layers dequantize the weight to the activation dtype (in float32 first,
  one rounding) and run ``F.linear`` in the activation dtype;
* FP8 and SmoothQuant layers quantize-dequantize the activation, accumulate in float32
  (FP8) or exactly (int8 codes in float64 emulate the int32 accumulator), apply the
  scales and bias in float32 and round once to the activation dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.quantization.act_quant import Fp8Linear, SmoothQuantLinear, smoothing_scale
from rtllm.quantization.config import QuantAlgo, QuantConfig
from rtllm.quantization.weight_only import (
    WeightOnlyGroupwiseLinear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
)

__all__ = [
    "Fp8Linear",
    "SmoothQuantLinear",
    "WeightOnlyGroupwiseLinear",
    "WeightOnlyInt4Linear",
    "WeightOnlyInt8Linear",
    "quant_linear_class",
    "quantize_linear",
    "smoothing_scale",
]


def quant_linear_class(config: QuantConfig | None) -> type[nn.Module] | None:
    """The layer class for ``config.quant_algo``; ``None`` when weights stay float."""
    if config is None or config.quant_algo in (None, QuantAlgo.NO_QUANT):
        return None
    algo = config.quant_algo
    if algo == QuantAlgo.W8A16:
        return WeightOnlyInt8Linear
    if algo in WeightOnlyInt4Linear._ALGOS:
        return WeightOnlyInt4Linear
    if algo == QuantAlgo.W8A16_GPTQ:
        return WeightOnlyGroupwiseLinear
    if algo in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN):
        return Fp8Linear
    if algo == QuantAlgo.W8A8_SQ_PER_CHANNEL:
        return SmoothQuantLinear
    raise ValueError(f"no quantized linear layer for quant_algo {algo}")


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig
) -> nn.Module:
    """``from_float`` of the class :func:`quant_linear_class` picks (RTN, no calibration)."""
    cls = quant_linear_class(config)
    if cls is None:
        raise ValueError(f"quant_algo {config.quant_algo} does not quantize linear layers")
    return cls.from_float(weight, bias, config)
