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

``QuantConfig.pre_quant_scale=True`` keeps every scale in its layer instead.

Under tensor parallelism every rank calibrates its own shard on the same samples, in
step (the calibration forward runs the model's all-reduces). A rank folds its scales
into its own copy of the norms and its own producer rows (v, up), so its layers stay
consistent whatever it chose. Column-parallel scales are still chosen as one process
would choose them: AWQ adds the candidates' errors over the ranks before choosing
(the ranks hold disjoint rows of one input, so the sum is the one-process error), and
SmoothQuant takes the weight's column maxima over all ranks' rows. A row-parallel
rank's scales, input maxima and GPTQ Hessian cover its own input channels; its GPTQ
thus drops the cross-rank blocks of the one-process Hessian. Pipeline parallelism is
not supported.

W4A16_AWQ is **AWQ scale search + GPTQ rounding**, and W4A16_GPTQ / W8A16_GPTQ (and
FP8 / FP8_PER_CHANNEL_PER_TOKEN with ``fp8_weight_rounding="gptq"``, on the FP8 grid
of :mod:`rtllm.quantization.gptq_fp8`) are GPTQ rounding, all calibrated decoder layer
by decoder layer
(:func:`calibrate_sequentially`): each layer's statistics come from the inputs the
layers before it, already quantized, produce; AWQ's scale ``s`` minimises the
linear's output error over every calibration token (:mod:`rtllm.quantization.awq`),
then :mod:`rtllm.quantization.gptq` rounds the scaled weights with the Hessian of the
inputs each linear sees. SmoothQuant and static FP8 with round-to-nearest weights
(``fp8_weight_rounding="nearest"``) use one pass of the float model
(:func:`smooth_model`), as does AWQ's folding alone (with the optional weight
clipping search, ``awq.AWQ_CLIP``, off by default) when :func:`smooth_model` gets
statistics of a plain token list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rtllm.distributed.parallel_state import get_mapping, tp_all_reduce, tp_all_reduce_max
from rtllm.layers.linear import Linear
from rtllm.layers.parallel_linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
)
from rtllm.quantization import awq as awq_module
from rtllm.quantization.act_quant import smoothing_scale
from rtllm.quantization.awq import awq_search_clip, awq_search_scale, fake_quantize
from rtllm.quantization.calibration import (
    ActivationStats,
    calibration_samples,
    collect_activation_stats,
    decoder_layer_inputs,
    linear_input_stats,
    run_decoder_layer,
)
from rtllm.quantization.config import QuantAlgo, QuantConfig
from rtllm.quantization.gptq import gptq_quantize, hessian
from rtllm.quantization.gptq_fp8 import gptq_quantize_fp8

logger = logging.getLogger(__name__)

__all__ = [
    "LayerCalibration",
    "calibrate_and_quantize",
    "calibrate_sequentially",
    "fake_quantize",
    "smooth_model",
]

#: Bits of the algorithms whose weights are rounded by GPTQ (after AWQ's scales for
#: W4A16_AWQ) in :func:`calibrate_sequentially`.
_GPTQ_BITS = {QuantAlgo.W4A16_AWQ: 4, QuantAlgo.W4A16_GPTQ: 4, QuantAlgo.W8A16_GPTQ: 8}
#: AWQ's per-channel activation statistic in the layer-by-layer calibration: ``"amax"``
#: (largest ``|x|``) or ``"mean"`` (mean ``|x|``).
AWQ_BASE = "amax"
#: Round each AWQ scale candidate with GPTQ (instead of RTN) in the scale search.
AWQ_SEARCH_GPTQ = False


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


def _plan(layer: nn.Module) -> list[tuple[Linear, Any, tuple[Linear, int] | None]]:
    """(consumer, norm it follows or None, (producer, first row) it can fold into); rows
    are the rank's own under tensor parallelism (its heads, its slice of the MLP)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [
        (attn.qkv_proj, layer.input_layernorm, None),
        (mlp.gate_up_proj, layer.post_attention_layernorm, None),
        (attn.o_proj, None, (attn.qkv_proj, attn.qkv_proj.q_size + attn.qkv_proj.kv_size)),
        (mlp.down_proj, None, (mlp.gate_up_proj, mlp.gate_up_proj.out_features // 2)),
    ]


def _rows_split_over_ranks(linear: Linear) -> bool:
    """The layer holds some of the output rows (column-parallel, under tensor
    parallelism): its input is whole on every rank, its weight is not."""
    column_parallel = (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear)
    return isinstance(linear, column_parallel) and get_mapping().tp_size > 1


def _sum_over_ranks() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """:func:`awq_search_scale`'s ``sum_errors`` under tensor parallelism: every rank's
    search then sees the same totals and picks the same scale."""
    return tp_all_reduce if get_mapping().tp_size > 1 else None


@torch.no_grad()
def _apply_scale(
    config: QuantConfig,
    layer: nn.Module,
    step: tuple[Linear, Any, tuple[Linear, int] | None],
    s: torch.Tensor,
) -> torch.Tensor | None:
    """Fold ``1 / s`` of a consumer whose weight was multiplied by ``s`` (module doc);
    returns ``1 / s`` when the layer has to keep it as its ``pre_quant_scale``."""
    linear, norm, producer = step
    attn = layer.self_attn
    awq = config.quant_algo == QuantAlgo.W4A16_AWQ
    foldable = producer is not None and awq and producer[0].weight is not None
    if config.pre_quant_scale or (norm is None and not foldable):
        return (1.0 / s).float()
    if norm is not None:
        norm.weight.data /= s.to(norm.weight.dtype)
    else:
        target, start = producer
        if linear is attn.o_proj:  # one scale per KV channel (the rank's own heads)
            group = attn.num_heads // attn.num_kv_heads
            s = s.view(attn.num_kv_heads, group, -1)[:, 0, :].reshape(-1)
        _fold_rows(target, start, s)
    return None


def _awq_base(config: QuantConfig, layer: nn.Module, linear: Linear, amax: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """AWQ's per-channel activation statistic (:data:`AWQ_BASE`) of ``linear``'s input;
    o_proj's is reduced over the q heads sharing a KV head when folded into v rows."""
    base = mean if AWQ_BASE == "mean" and mean is not None else amax
    attn = layer.self_attn
    if linear is attn.o_proj and not config.pre_quant_scale:
        base = _kv_group_amax(base, attn.num_heads, attn.num_kv_heads)
    return base


@torch.no_grad()
def smooth_model(
    model: nn.Module, config: QuantConfig, stats: dict[str, ActivationStats]
) -> dict[str, LayerCalibration]:
    """Compute AWQ / SmoothQuant scales for the float linears in ``stats`` (keyed by
    ``Linear.prefix``), fold them (module doc) and return what each layer still needs.

    For W4A16_AWQ this only folds the scales (the float model's function is unchanged);
    quantizing with AWQ + GPTQ is :func:`calibrate_sequentially` (see
    :func:`calibrate_and_quantize`).
    """
    result = {name: LayerCalibration(input_amax=float(s.amax.max())) for name, s in stats.items()}
    if config.quant_algo not in (QuantAlgo.W4A16_AWQ, QuantAlgo.W8A8_SQ_PER_CHANNEL):
        return result
    for layer in model.model.layers:
        for step in _plan(layer):
            linear = step[0]
            if linear.prefix not in stats or linear.weight is None:
                continue
            layer_stats = stats[linear.prefix]
            if config.quant_algo == QuantAlgo.W4A16_AWQ:
                rows = layer_stats.rows.to(linear.weight.device)
                base = _awq_base(config, layer, linear, layer_stats.amax, None)
                s = awq_search_scale(linear.weight.data, rows.t() @ rows, base, config, sum_errors=_sum_over_ranks())
            else:
                weight_amax = None
                if _rows_split_over_ranks(linear):  # the maxima over every rank's rows
                    weight_amax = tp_all_reduce_max(linear.weight.data.float().abs().amax(dim=0))
                s = smoothing_scale(
                    layer_stats.amax.to(linear.weight.device), linear.weight.data, config.smoothquant_val,
                    weight_amax,
                )
            linear.weight.data *= s.to(linear.weight.dtype)
            if config.quant_algo == QuantAlgo.W4A16_AWQ and awq_module.AWQ_CLIP:
                x = layer_stats.rows.to(s.device) / s
                first = 0
                if linear is layer.self_attn.qkv_proj and not awq_module.CLIP_QK:
                    first = linear.q_size + linear.kv_size
                awq_search_clip(linear.weight.data, x, config, slice(first, linear.out_features))
            result[linear.prefix].pre_quant_scale = _apply_scale(config, layer, step, s)
    return result


@torch.no_grad()
def _gptq_round(linear: Linear, h: torch.Tensor, config: QuantConfig, shard_scales: bool) -> torch.Tensor:
    """GPTQ's rounding of ``linear``'s float weight on ``config``'s grid, as the float
    weight ``[out, in]`` (float32) that round-to-nearest re-quantizes to its codes."""
    w = linear.weight.data
    if config.gptq_fp8_rounding:
        per_channel = config.quant_algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN
        blocks = None
        if shard_scales and not per_channel:  # one per-tensor scale per checkpoint shard
            blocks = [size for _, size in sorted(linear.shard_rows(s) for s in linear.shard_ids())]
        return gptq_quantize_fp8(w, h, per_channel, blocks).dequantized
    bits = _GPTQ_BITS[config.quant_algo]
    return gptq_quantize(w, h, bits, config.weight_group_size, config.has_zero_point).dequantized


@torch.no_grad()
def calibrate_sequentially(
    model: nn.Module,
    config: QuantConfig,
    samples: list[torch.Tensor],
    linears: dict[str, Linear],
    fp8_shard_scales: bool = False,
) -> dict[str, LayerCalibration]:
    """AWQ scale search + GPTQ rounding (W4A16_AWQ), or GPTQ rounding alone
    (W4A16_GPTQ, W8A16_GPTQ; FP8 and FP8_PER_CHANNEL_PER_TOKEN with
    ``fp8_weight_rounding="gptq"``), of the float ``linears`` (prefix -> layer), decoder
    layer by decoder layer on ``samples``. FP8 per-tensor weights get one scale for
    each fused linear (as quantizing it on load does) or, with ``fp8_shard_scales``, one
    per checkpoint shard (``q``/``k``/``v``, ``gate``/``up``: as ``rtllm quantize``
    writes them).

    For each decoder layer, on the inputs it receives from the layers before it, *as
    already quantized*:

    1. AWQ only: one pass records each linear's input statistics; each linear's scale
       ``s`` is searched (:func:`~rtllm.quantization.awq.awq_search_scale`, error over
       every calibration token through ``X^T X``) and folded (module doc) -- all four
       before any rounding, since o_proj's and down_proj's fold into qkv's / gate_up's
       rows;
    2. in execution order (qkv, o, gate_up, down), each linear's inputs are recorded
       again with the linears before it already rounded (and smoothed), and its weight
       is rounded by :func:`~rtllm.quantization.gptq.gptq_quantize` (FP8:
       :func:`~rtllm.quantization.gptq_fp8.gptq_quantize_fp8`) with the Hessian of
       those inputs;
    3. the layer runs once more to give the next layer its inputs.

    The rounded weights stay in the float model as ``(q - zero) * scale`` (FP8: ``q *
    scale``; the float forward of the later steps is the quantized model's weights, with
    float activations); re-quantizing them with round-to-nearest reproduces GPTQ's codes
    exactly (see :mod:`rtllm.quantization.gptq`, :mod:`rtllm.quantization.gptq_fp8`), so :func:`rtllm.quantization.linear_method.quantize_float` and ``rtllm
    quantize`` store them unchanged. Returns what each layer still needs.
    """
    awq = config.quant_algo == QuantAlgo.W4A16_AWQ
    result: dict[str, LayerCalibration] = {}
    handles = []
    start = time.perf_counter()
    inputs = decoder_layer_inputs(model, samples)
    try:
        layers = list(model.model.layers)
        for index, layer in enumerate(layers):
            plan = [s for s in _plan(layer) if s[0].prefix in linears and s[0].weight is not None]
            if awq and plan:
                stats = linear_input_stats(model, layer, inputs, {s[0].prefix: s[0] for s in plan})
                for step in plan:
                    linear = step[0]
                    st = stats[linear.prefix]
                    base = _awq_base(config, layer, linear, st.amax, st.mean_abs)
                    s = awq_search_scale(
                        linear.weight.data, st.gram, base, config, gptq=AWQ_SEARCH_GPTQ, sum_errors=_sum_over_ranks()
                    )
                    linear.weight.data *= s.to(linear.weight.dtype)
                    pqs = _apply_scale(config, layer, step, s)
                    result[linear.prefix] = LayerCalibration(pre_quant_scale=pqs)
                    if pqs is not None:  # the float forward applies it as the layer will
                        handles.append(linear.register_forward_pre_hook(_scale_input(pqs)))
            order = {id(m): i for i, m in enumerate(_execution_order(layer))}
            for linear, _, _ in sorted(plan, key=lambda s: order[id(s[0])]):
                st = linear_input_stats(model, layer, inputs, {linear.prefix: linear}, linear)[linear.prefix]
                rounded = _gptq_round(linear, hessian(st.gram, st.count), config, fp8_shard_scales)
                linear.weight.data.copy_(rounded.to(linear.weight.dtype))
                calib = result.setdefault(linear.prefix, LayerCalibration())
                calib.input_amax = float(st.amax.max())
            if index + 1 < len(layers):
                inputs = run_decoder_layer(model, layer, inputs)
            logger.debug("calibrated layer %d (%.1f s)", index, time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    logger.info(
        "%s: %d linear layers rounded on %d samples in %.1f s",
        "AWQ + GPTQ" if awq else "GPTQ (FP8)" if config.gptq_fp8_rounding else "GPTQ", len(result), len(samples), time.perf_counter() - start,
    )
    return result


def _execution_order(layer: nn.Module) -> list[Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]


def _scale_input(scale: torch.Tensor):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] * scale.to(args[0].dtype), *args[1:])

    return hook


def needs_sequential_calibration(config: QuantConfig) -> bool:
    """AWQ + GPTQ and GPTQ (integer or FP8 grid) calibrate layer by layer
    (:func:`calibrate_sequentially`)."""
    return config.quant_algo in _GPTQ_BITS or config.gptq_fp8_rounding


def calibrate_and_quantize(model: nn.Module, config: QuantConfig, model_path: str) -> None:
    """Calibrate the float linears awaiting it (AWQ, GPTQ, SmoothQuant, static FP8) on
    ``config``'s calibration text, smooth / round and quantize them."""
    from rtllm.llmapi.tokenizer import load_tokenizer

    linears = {
        m.prefix: m for m in model.modules() if isinstance(m, Linear) and m.awaiting_calibration
    }
    samples = calibration_samples(load_tokenizer(model_path), config)
    if needs_sequential_calibration(config):
        calibrations = calibrate_sequentially(model, config, samples, linears)
    else:
        stats = collect_activation_stats(model, samples, linears)
        calibrations = smooth_model(model, config, stats)
    for name, linear in linears.items():
        calib = calibrations[name]
        linear.quantize_float_weight(calib.pre_quant_scale, calib.input_amax)
    logger.info("calibrated and quantized %d linear layers (%s)", len(linears), config.quant_algo)
