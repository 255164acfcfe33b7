"""Quantization: configuration (TensorRT-LLM's names), int4 packing and the AWQ/GPTQ
checkpoint layouts, round-to-nearest quantizers and quantized linear layers with CPU
reference forward passes."""

from rtllm.quantization.config import QuantConfig, is_module_excluded
from rtllm.quantization.mode import QuantAlgo, QuantMode
from rtllm.quantization.qlinear import (
    Fp8Linear,
    SmoothQuantLinear,
    WeightOnlyGroupwiseLinear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    quant_linear_class,
    quantize_linear,
)

__all__ = [
    "Fp8Linear",
    "QuantAlgo",
    "QuantConfig",
    "QuantMode",
    "SmoothQuantLinear",
    "WeightOnlyGroupwiseLinear",
    "WeightOnlyInt4Linear",
    "WeightOnlyInt8Linear",
    "is_module_excluded",
    "quant_linear_class",
    "quantize_linear",
]
