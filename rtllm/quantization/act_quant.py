"""Linear layers that quantize activations too (FP8, SmoothQuant W8A8): CPU reference.

Both operands are quantize-dequantized, then accumulated in float32 (FP8) or exactly
(int8 codes in float64 emulate the int32 accumulator); scales and bias are applied in
float32 and the result is rounded once to the activation dtype.
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F

from rtllm.quantization._linear_base import QuantizedLinear, check_algo, check_float_weight, frozen
from rtllm.quantization.config import QuantAlgo, QuantConfig
from rtllm.quantization.rtn import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize,
    quantize_fp8,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
    quantize_int8_per_channel,
    quantize_per_token_fp8,
    quantize_per_token_int8,
)


class Fp8Linear(QuantizedLinear):
    """FP8 E4M3 weights and activations (``FP8``, ``FP8_PER_CHANNEL_PER_TOKEN``).

    ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` float32 ``[]`` (per tensor)
    or ``[out, 1]`` (per channel); ``input_scale`` float32 ``[]`` for static activation
    scales, else ``None`` and each token gets the dynamic scale ``amax / 448``. The
    forward pass emulates an FP8 GEMM: both operands are rounded to FP8, then the
    product is accumulated in float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        per_channel: bool = False,
        static_input_scale: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.weight = frozen(torch.zeros(out_features, in_features, dtype=FP8_DTYPE))
        self.weight_scale = frozen(torch.ones(out_features, 1) if per_channel else torch.ones(()))
        if static_input_scale:
            self.input_scale = frozen(torch.ones(()))
        else:
            self.register_parameter("input_scale", None)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: QuantConfig,
        input_amax: float | torch.Tensor | None = None,
    ) -> Self:
        """Quantize a float weight. ``activation_scheme="static"`` needs the calibrated
        ``input_amax`` (largest ``|x|``); the static scale is ``input_amax / 448``."""
        check_algo(cls, config, (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN))
        check_float_weight(weight, bias)
        per_channel = config.quant_algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN
        static = config.activation_scheme == "static"
        if static and input_amax is None:
            raise ValueError("activation_scheme='static' needs input_amax from calibration")
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            bias is not None,
            per_channel,
            static,
            bias.dtype if bias is not None else weight.dtype,
        )
        q, scale = (
            quantize_fp8_per_channel(weight) if per_channel else quantize_fp8_per_tensor(weight)
        )
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if static:
            amax = float(input_amax)
            layer.input_scale.data.fill_(amax / FP8_MAX if amax > 0 else 1.0)
        layer._copy_bias(bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` weight this layer multiplies by."""
        return dequantize(self.weight, self.weight_scale, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:
            xq, x_scale = quantize_per_token_fp8(x)
        else:
            x_scale = self.input_scale
            xq = quantize_fp8(x, x_scale)
        y = F.linear(xq.float() * x_scale, self.dequantized_weight(), self._bias_as(torch.float32))
        return y.to(x.dtype)


def smoothing_scale(
    act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5, weight_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale ``s_j = amax_x[j]**alpha / amax_w[j]**(1-alpha)``.

    ``act_amax`` is ``[in]`` (largest ``|x|`` per channel over calibration data),
    ``weight`` ``[out, in]``. The smoothed layer computes ``(x / s) (W * s)^T``, which
    moves activation outliers into the weights. Both maxima are floored at 1e-5 so
    that dead channels give finite, positive scales. ``weight_amax`` ``[in]`` replaces
    the weight's own column maxima (a tensor-parallel rank holding some of the rows
    passes the maxima over all of them).
    """
    if act_amax.shape != (weight.shape[1],):
        raise ValueError(f"act_amax must be [{weight.shape[1]}], got {tuple(act_amax.shape)}")
    x_max = act_amax.float().abs().clamp(min=1e-5)
    w_max = (weight.float().abs().amax(dim=0) if weight_amax is None else weight_amax.float()).clamp(min=1e-5)
    return x_max.pow(alpha) / w_max.pow(1.0 - alpha)


class SmoothQuantLinear(QuantizedLinear):
    """W8A8 SmoothQuant: int8 weights per output channel, int8 activations per token.

    ``weight`` int8 ``[out, in]`` (already multiplied by the smoothing scale ``s``),
    ``weight_scale`` float32 ``[out, 1]``. The ``1 / s`` on the input side is either
    folded into the previous op (the norm's weight: ``pre_quant_scale=False``, the
    default, free at run time) or held here as ``pre_quant_scale`` ``[in]`` and
    multiplied into the input before its per-token quantization
    (``QuantConfig.pre_quant_scale=True``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        pre_quant_scale: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.weight = frozen(torch.zeros(out_features, in_features, dtype=torch.int8))
        self.weight_scale = frozen(torch.ones(out_features, 1))
        if pre_quant_scale:
            self.pre_quant_scale = frozen(torch.ones(in_features))
        else:
            self.register_parameter("pre_quant_scale", None)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: QuantConfig,
        act_amax: torch.Tensor | None = None,
    ) -> Self:
        """Quantize a float weight, smoothing it when ``act_amax`` (``[in]``) is given.

        Smoothing here needs ``config.pre_quant_scale=True`` (the layer applies
        ``1 / s``); to fold ``1 / s`` into the previous op instead, compute
        :func:`smoothing_scale`, divide the previous op's output by it and pass
        ``weight * s`` with ``act_amax=None``.
        """
        check_algo(cls, config, (QuantAlgo.W8A8_SQ_PER_CHANNEL,))
        check_float_weight(weight, bias)
        if act_amax is not None and not config.pre_quant_scale:
            raise ValueError(
                "act_amax given but config.pre_quant_scale is False: fold the smoothing "
                "scale into the previous op and pass the smoothed weight instead"
            )
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            bias is not None,
            config.pre_quant_scale,
            bias.dtype if bias is not None else weight.dtype,
        )
        w = weight.float()
        if act_amax is not None:
            s = smoothing_scale(act_amax, w, config.smoothquant_val)
            w = w * s
            layer.pre_quant_scale.data.copy_(1.0 / s)
        q, scale = quantize_int8_per_channel(w)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        layer._copy_bias(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.pre_quant_scale is not None:
            xf = xf * self.pre_quant_scale
        xq, x_scale = quantize_per_token_int8(xf)
        # float64 holds every int8 x int8 dot product of K < 2**38 terms exactly, so this
        # matches an int32-accumulating kernel bit for bit before the scales.
        acc = F.linear(xq.double(), self.weight.double()).float()
        y = acc * x_scale * self.weight_scale.view(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
