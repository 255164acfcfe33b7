"""AWQ and SmoothQuant on a float model: per-input-channel scales from calibration,
folded into the previous op where possible, then quantization.

Both move per-channel magnitude from activations into weights: the layer computes
``(x / s) (W * s)^T``, equal to ``x W^T`` in float. Where ``x / s`` goes:

=====================  ===================================================================
consumer               where ``1 / s`` is applied
=====================  ===================================================================
``qkv_proj``           folded into ``input_layernorm.weight`` (AWQ and SmoothQuant)
``gate_up_proj``       folded into ``post_attention_layernorm.weight`` (both)
``o_proj``             AWQ: folded into the ``v`` rows of ``qkv_proj`` (attention output
                       is linear in V); under grouped-query attention the q heads sharing
                       a KV head share one scale, so ``amax`` is reduced over the group
                       first. SmoothQuant: kept as the layer's ``pre_quant_scale``
``down_proj``          AWQ: folded into the ``up`` rows of ``gate_up_proj``
                       (``silu(gate) * up`` is linear in up). SmoothQuant: kept as the
                       layer's ``pre_quant_scale``
=====================  ===================================================================

``QuantConfig.pre_quant_scale=True`` keeps every scale in its layer instead. The
statistics come from one pass of the float model (AutoAWQ re-runs each block after
quantizing the previous one; rtllm does not, a simplification).

AWQ's searches (per layer, fused layers as one; :mod:`rtllm.quantization.awq`): the
scale ``s`` minimising the layer's output error, then (``awq.AWQ_CLIP``, off by
default) each group's weight clipping range on ``W * s`` and inputs ``x / s``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rtllm.layers.linear import Linear
from rtllm.quantization import awq as awq_module
from rtllm.quantization.act_quant import smoothing_scale
from rtllm.quantization.awq import awq_search_clip, awq_search_scale, fake_quantize
from rtllm.quantization.calibration import (
    ActivationStats,
    calibration_samples,
    collect_activation_stats,
)
from rtllm.quantization.config import QuantAlgo, QuantConfig

logger = logging.getLogger(__name__)

__all__ = ["LayerCalibration", "calibrate_and_quantize", "fake_quantize", "smooth_model"]


@dataclass(slots=True)
class LayerCalibration:
    """What a calibrated float layer needs to be quantized."""

    pre_quant_scale: torch.Tensor | None = None  # [in], multiplies the layer's input
    input_amax: float | None = None  # largest |x| (static FP8 input scale)


def _kv_group_amax(amax: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Reduce o_proj's input amax ``[H * D]`` over the q heads sharing a KV head."""
    group = num_heads // num_kv_heads
    per_kv = amax.view(num_kv_heads, group, -1).amax(dim=1, keepdim=True)
    return per_kv.expand(num_kv_heads, group, per_kv.shape[-1]).reshape(-1)


@torch.no_grad()
def _fold_rows(linear: Linear, start: int, scale: torch.Tensor) -> None:
    """Divide output rows ``[start, start + len(scale))`` of a float layer by ``scale``."""
    rows = slice(start, start + scale.numel())
    linear.weight.data[rows] /= scale[:, None].to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data[rows] /= scale.to(linear.bias.dtype)


def _scale_for(
    config: QuantConfig, linear: Linear, stats: ActivationStats, amax: torch.Tensor
) -> torch.Tensor:
    if config.quant_algo == QuantAlgo.W4A16_AWQ:
        return awq_search_scale(linear.weight.data, stats, amax, config)
    return smoothing_scale(amax.to(linear.weight.device), linear.weight.data, config.smoothquant_val)


@torch.no_grad()
def smooth_model(
    model: nn.Module, config: QuantConfig, stats: dict[str, ActivationStats]
) -> dict[str, LayerCalibration]:
    """Compute AWQ / SmoothQuant scales for the float linears in ``stats`` (keyed by
    ``Linear.prefix``), fold them (module doc) and return what each layer still needs."""
    result = {name: LayerCalibration(input_amax=float(s.amax.max())) for name, s in stats.items()}
    if config.quant_algo not in (QuantAlgo.W4A16_AWQ, QuantAlgo.W8A8_SQ_PER_CHANNEL):
        return result
    mc = model.config
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        # (consumer, norm it follows or None, (producer, first row) it can fold into)
        plan: list[tuple[Linear, Any, tuple[Linear, int] | None]] = [
            (attn.qkv_proj, layer.input_layernorm, None),
            (mlp.gate_up_proj, layer.post_attention_layernorm, None),
            (attn.o_proj, None, (attn.qkv_proj, attn.qkv_proj.q_size + attn.qkv_proj.kv_size)),
            (mlp.down_proj, None, (mlp.gate_up_proj, mc.intermediate_size)),
        ]
        for linear, norm, producer in plan:
            if linear.prefix not in stats or linear.weight is None:
                continue
            layer_stats = stats[linear.prefix]
            awq = config.quant_algo == QuantAlgo.W4A16_AWQ
            amax = layer_stats.amax
            if awq and linear is attn.o_proj and not config.pre_quant_scale:
                amax = _kv_group_amax(amax, mc.num_attention_heads, mc.num_key_value_heads)
            s = _scale_for(config, linear, layer_stats, amax)
            linear.weight.data *= s.to(linear.weight.dtype)
            if awq and awq_module.AWQ_CLIP:
                x = layer_stats.rows.to(s.device) / s
                first = 0
                if linear is attn.qkv_proj and not awq_module.CLIP_QK:
                    first = attn.qkv_proj.q_size + attn.qkv_proj.kv_size
                awq_search_clip(linear.weight.data, x, config, slice(first, linear.out_features))
            foldable = producer is not None and awq and producer[0].weight is not None
            if config.pre_quant_scale or (norm is None and not foldable):
                result[linear.prefix].pre_quant_scale = (1.0 / s).float()
            elif norm is not None:
                norm.weight.data /= s.to(norm.weight.dtype)
            else:
                target, start = producer
                if linear is attn.o_proj:  # one scale per KV channel
                    group = mc.num_attention_heads // mc.num_key_value_heads
                    s = s.view(mc.num_key_value_heads, group, -1)[:, 0, :].reshape(-1)
                _fold_rows(target, start, s)
    return result


def calibrate_and_quantize(model: nn.Module, config: QuantConfig, model_path: str) -> None:
    """Calibrate the float linears awaiting it (AWQ, SmoothQuant, static FP8) on
    ``config``'s calibration text, smooth and quantize them."""
    from rtllm.llmapi.tokenizer import load_tokenizer

    linears = {
        m.prefix: m for m in model.modules() if isinstance(m, Linear) and m.awaiting_calibration
    }
    samples = calibration_samples(load_tokenizer(model_path), config)
    calibrations = smooth_model(model, config, collect_activation_stats(model, samples, linears))
    for name, linear in linears.items():
        calib = calibrations[name]
        linear.quantize_float_weight(calib.pre_quant_scale, calib.input_amax)
    logger.info("calibrated and quantized %d linear layers (%s)", len(linears), config.quant_algo)
