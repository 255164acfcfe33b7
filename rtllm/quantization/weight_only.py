"""Weight-only quantized linear layers (W8A16, W4A16, AWQ, GPTQ): CPU reference.

The weight is dequantized to the activation dtype (in float32 first, one rounding) and
``F.linear`` runs in the activation dtype.
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F

from rtllm.quantization._linear_base import QuantizedLinear, check_algo, check_float_weight, frozen
from rtllm.quantization.config import QuantAlgo, QuantConfig
from rtllm.quantization.packing import GroupwiseWeights
from rtllm.quantization.rtn import (
    dequantize,
    quantize_groupwise_asymmetric,
    quantize_groupwise_symmetric,
    quantize_int8_per_channel,
)

_GROUPWISE_BITS = {
    QuantAlgo.W4A16: 4,
    QuantAlgo.W4A16_AWQ: 4,
    QuantAlgo.W4A16_GPTQ: 4,
    QuantAlgo.W8A16_GPTQ: 8,
}


class WeightOnlyInt8Linear(QuantizedLinear):
    """W8A16: int8 weights with one scale per output channel, float activations.

    ``weight`` int8 ``[out, in]``, ``weight_scale`` float32 ``[out, 1]``;
    ``y = x (weight * weight_scale)^T + bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.weight = frozen(torch.zeros(out_features, in_features, dtype=torch.int8))
        self.weight_scale = frozen(torch.ones(out_features, 1))

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig
    ) -> Self:
        """Quantize a float ``[out, in]`` weight (RTN); ``config.quant_algo`` W8A16."""
        check_algo(cls, config, (QuantAlgo.W8A16,))
        check_float_weight(weight, bias)
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            bias is not None,
            bias.dtype if bias is not None else weight.dtype,
        )
        q, scale = quantize_int8_per_channel(weight)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        layer._copy_bias(bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` weight this layer multiplies by."""
        return dequantize(self.weight, self.weight_scale, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias_as(x.dtype))


class WeightOnlyGroupwiseLinear(QuantizedLinear):
    """Groupwise int4/int8 weights along the input dim with integer zero points.

    ``weight`` uint8 ``[out, in]`` (codes in ``[0, 2**bits)``), ``weight_zero`` int32
    ``[out, G]``, ``weight_scale`` float32 ``[out, G]``, ``G = in / group_size``
    (``group_size=-1``: ``G = 1``); ``w = (weight - weight_zero) * weight_scale``.
    Symmetric weights store the constant zero ``2**(bits-1)``, so one layout serves
    RTN, AWQ and GPTQ. ``float_zero=True`` holds ``weight_zero`` as float32 instead
    (GGUF Q4_1 stores a float group minimum ``m``: ``zero = -m / scale``). With
    ``pre_quant_scale`` (AWQ's per-input-channel vector, when
    not folded into the previous op) the input is multiplied by it first.
    """

    _ALGOS: tuple[QuantAlgo, ...] = tuple(_GROUPWISE_BITS)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        pre_quant_scale: bool = False,
        dtype: torch.dtype | None = None,
        float_zero: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        group = in_features if group_size == -1 else group_size
        if group <= 0 or in_features % group != 0:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.bits = bits
        self.group_size = group_size
        num_groups = in_features // group
        self.weight = frozen(torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.weight_zero = frozen(
            torch.full(
                (out_features, num_groups),
                1 << (bits - 1),
                dtype=torch.float32 if float_zero else torch.int32,
            )
        )
        self.weight_scale = frozen(torch.ones(out_features, num_groups))
        if pre_quant_scale:
            self.pre_quant_scale = frozen(torch.ones(in_features))
        else:
            self.register_parameter("pre_quant_scale", None)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig
    ) -> Self:
        """Quantize a float ``[out, in]`` weight (RTN) for W4A16, W4A16_AWQ, W4A16_GPTQ
        or W8A16_GPTQ; the group size must divide ``in`` (``ValueError`` otherwise).
        A ``pre_quant_scale`` is created as ones (no calibration here)."""
        check_algo(cls, config, cls._ALGOS)
        check_float_weight(weight, bias)
        out_features, in_features = weight.shape
        config.check_in_features(in_features)
        bits = _GROUPWISE_BITS[config.quant_algo]
        group = config.weight_group_size
        if config.has_zero_point:
            q, scale, zero = quantize_groupwise_asymmetric(weight, group, bits)
        else:
            signed, scale = quantize_groupwise_symmetric(weight, group, bits)
            offset = 1 << (bits - 1)
            q = (signed.to(torch.int16) + offset).to(torch.uint8)
            zero = torch.full_like(scale, offset, dtype=torch.int32)
        layer = cls(
            in_features,
            out_features,
            bits=bits,
            group_size=group,
            bias=bias is not None,
            pre_quant_scale=config.pre_quant_scale,
            dtype=bias.dtype if bias is not None else weight.dtype,
        )
        layer._load(GroupwiseWeights(q, zero, scale), bias, None)
        return layer

    @classmethod
    def from_quantized(
        cls,
        weights: GroupwiseWeights,
        bias: torch.Tensor | None = None,
        bits: int = 4,
        pre_quant_scale: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Build from internal-layout integer weights, e.g. :func:`unpack_awq` or
        :func:`unpack_gptq` output of a checkpoint."""
        out_features, in_features = weights.q.shape
        num_groups = weights.scales.shape[1]
        group = -1 if num_groups == 1 else in_features // num_groups
        layer = cls(
            in_features,
            out_features,
            bits=bits,
            group_size=group,
            bias=bias is not None,
            pre_quant_scale=pre_quant_scale is not None,
            dtype=dtype,
            float_zero=weights.zeros.is_floating_point(),
        )
        layer._load(weights, bias, pre_quant_scale)
        return layer

    def _load(
        self,
        weights: GroupwiseWeights,
        bias: torch.Tensor | None,
        pre_quant_scale: torch.Tensor | None,
    ) -> None:
        q, zeros, scales = weights
        # copy_ would broadcast a [out, 1] zero or scale silently: check shapes exactly.
        if q.shape != self.weight.shape or not (
            zeros.shape == scales.shape == self.weight_scale.shape
        ):
            raise ValueError(
                f"expected q {tuple(self.weight.shape)}, zeros and scales "
                f"{tuple(self.weight_scale.shape)}; got {tuple(q.shape)}, "
                f"{tuple(zeros.shape)}, {tuple(scales.shape)}"
            )
        if q.numel() and int(q.max()) >= 1 << self.bits:
            raise ValueError(f"codes exceed {self.bits} bits")
        self.weight.data.copy_(q)
        self.weight_zero.data.copy_(zeros)
        self.weight_scale.data.copy_(scales)
        if pre_quant_scale is not None:
            self.pre_quant_scale.data.copy_(pre_quant_scale)
        self._copy_bias(bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` weight this layer multiplies by."""
        return dequantize(self.weight, self.weight_scale, self.weight_zero, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias_as(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


class WeightOnlyInt4Linear(WeightOnlyGroupwiseLinear):
    """W4A16 (per channel), W4A16_AWQ and W4A16_GPTQ: :class:`WeightOnlyGroupwiseLinear`
    with 4-bit codes."""

    _ALGOS = (QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ, QuantAlgo.W4A16_GPTQ)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        pre_quant_scale: bool = False,
        dtype: torch.dtype | None = None,
        float_zero: bool = False,
    ) -> None:
        if bits != 4:
            raise ValueError(f"{type(self).__name__} holds 4-bit codes, got bits={bits}")
        super().__init__(
            in_features, out_features, 4, group_size, bias, pre_quant_scale, dtype, float_zero
        )
