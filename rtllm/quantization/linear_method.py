"""How a model's linear layer becomes a quantized one: which layers are quantized, empty
(dummy) quantized layers, and building one from the checkpoint tensors of its shards.
Which kernel then runs it: :mod:`rtllm.quantization.dispatch`.

A quantized :class:`rtllm.layers.linear.Linear` *stages* the checkpoint tensors of each
of its shards (``q``/``k``/``v`` of a fused ``qkv_proj``) and, once all are there,
calls :func:`build_from_staged`, which recognises the checkpoint format by tensor names
and dtypes (``staged[shard_id][suffix]``):

=====================  ===============================================================
float ``weight``       a float checkpoint: round-to-nearest (or, after calibration,
                       smoothed and/or GPTQ-rounded, FP8 included: the rounded float
                       weight gives back GPTQ's codes) quantization with
                       :func:`quantize_float`
``qweight`` (AWQ)      AutoAWQ GEMM packing (``qweight``/``qzeros``/``scales``)
``qweight`` (GPTQ)     AutoGPTQ v1 packing (``qweight``/``qzeros``/``scales``/``g_idx``)
float8 ``weight``      HF FP8: ``weight_scale`` per tensor, optional ``input_scale``
int ``weight``         rtllm's internal layout: ``weight`` (int8: signed symmetric;
                       uint8 with ``weight_zero``), ``weight_scale`` ``[out, G]``,
                       optional ``pre_quant_scale`` (SmoothQuant, GGUF, rtllm format)
=====================  ===============================================================

Shards are concatenated along the output dim (rows are independent in every layout).
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.quantization.act_quant import Fp8Linear, SmoothQuantLinear
from rtllm.quantization.config import QuantAlgo, QuantConfig
from rtllm.quantization.packing import GroupwiseWeights, unpack_awq, unpack_gptq
from rtllm.quantization.rtn import (
    FP8_DTYPE,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
    quantize_groupwise_asymmetric,
    quantize_groupwise_symmetric,
    quantize_int8_per_channel,
)
from rtllm.quantization.weight_only import (
    WeightOnlyGroupwiseLinear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
)

#: Fused modules whose input smoothing scale is folded into the preceding RMSNorm; the
#: other quantized linears (o_proj, down_proj) keep a ``pre_quant_scale`` under SmoothQuant.
NORM_FED_MODULES = ("qkv_proj", "gate_up_proj")
_BITS = {
    QuantAlgo.W4A16: 4,
    QuantAlgo.W4A16_AWQ: 4,
    QuantAlgo.W4A16_GPTQ: 4,
    QuantAlgo.W8A16_GPTQ: 8,
}


def layer_quant_config(
    config: QuantConfig | None, checkpoint_names: list[str]
) -> QuantConfig | None:
    """``config`` when the layer made of ``checkpoint_names`` is quantized, else ``None``.

    A fused layer is excluded when every shard's name is; excluding only some shards of
    a fused layer raises ``ValueError`` (one fused weight has one format).
    """
    if config is None or config.quant_algo in (None, QuantAlgo.NO_QUANT):
        return None
    excluded = [config.is_excluded(name) for name in checkpoint_names]
    if all(excluded):
        return None
    if any(excluded):
        raise ValueError(
            f"exclude_modules matches only some of the fused modules {checkpoint_names}; "
            "exclude all of them or none"
        )
    return config


def needs_calibration(config: QuantConfig) -> bool:
    """True when a float checkpoint needs calibration data before quantizing: AWQ
    (scale search + GPTQ rounding), GPTQ (rounding with the inputs' Hessian; not the
    float weights of a GGUF file kept quantized, which are rounded to nearest), FP8
    with ``fp8_weight_rounding="gptq"`` (GPTQ rounding on the FP8 grid), SmoothQuant
    and static FP8 (activation statistics)."""
    gptq = config.quant_algo in (QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ)
    return (
        config.quant_algo in (QuantAlgo.W4A16_AWQ, QuantAlgo.W8A8_SQ_PER_CHANNEL)
        or (gptq and not config.keep_gguf_quantized)
        or config.gptq_fp8_rounding
        or (config.quant_algo == QuantAlgo.FP8 and config.activation_scheme == "static")
    )


def holds_pre_quant_scale(config: QuantConfig, module_name: str) -> bool:
    """Whether the quantized layer ``module_name`` multiplies its input by a vector.

    ``config.pre_quant_scale=True`` keeps it in every AWQ/SmoothQuant layer. Otherwise
    AWQ folds every scale into the previous op (norms, the ``v`` rows of ``qkv_proj``,
    the ``up`` rows of ``gate_up_proj``), and SmoothQuant folds into the norms only:
    its ``o_proj`` and ``down_proj`` apply ``1 / s`` to their input inside the layer.
    """
    if config.pre_quant_scale:
        return True
    fed_by_norm = module_name.rsplit(".", 1)[-1] in NORM_FED_MODULES
    return config.quant_algo == QuantAlgo.W8A8_SQ_PER_CHANNEL and not fed_by_norm


def empty_quantized_linear(
    config: QuantConfig,
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype,
    pre_quant_scale: bool = False,
) -> nn.Module:
    """An unfilled quantized layer for ``config`` (no float weight is ever allocated)."""
    algo = config.quant_algo
    config.check_in_features(in_features)
    if algo == QuantAlgo.W8A16:
        return WeightOnlyInt8Linear(in_features, out_features, bias, dtype)
    if algo in _BITS:
        cls = WeightOnlyInt4Linear if _BITS[algo] == 4 else WeightOnlyGroupwiseLinear
        return cls(
            in_features,
            out_features,
            bits=_BITS[algo],
            group_size=config.weight_group_size,
            bias=bias,
            pre_quant_scale=pre_quant_scale,
            dtype=dtype,
        )
    if algo in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN):
        per_channel = algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN
        static = config.activation_scheme == "static"
        return Fp8Linear(in_features, out_features, bias, per_channel, static, dtype)
    if algo == QuantAlgo.W8A8_SQ_PER_CHANNEL:
        return SmoothQuantLinear(in_features, out_features, bias, pre_quant_scale, dtype)
    raise ValueError(f"no quantized linear layer for quant_algo {algo}")


@torch.no_grad()
def fill_dummy_(module: nn.Module, generator: torch.Generator, magnitude: float = 0.05) -> None:
    """Random codes whose dequantized weights lie in ``[-magnitude, magnitude]`` (like the
    float dummy weights), drawn directly in the quantized dtype, layer by layer."""
    w = module.weight
    if isinstance(module, WeightOnlyGroupwiseLinear):
        top = 1 << module.bits
        w.copy_(torch.randint(0, top, w.shape, generator=generator, device=w.device))
        module.weight_zero.fill_(top // 2)
        module.weight_scale.fill_(magnitude / (top // 2))
    elif isinstance(module, WeightOnlyInt8Linear | SmoothQuantLinear):
        w.copy_(torch.randint(-127, 128, w.shape, generator=generator, device=w.device))
        module.weight_scale.fill_(magnitude / 127)
    elif isinstance(module, Fp8Linear):
        # Byte patterns 0x00..0x7E with a random sign: every finite E4M3 value, no NaN.
        bits = torch.randint(0, 127, w.shape, generator=generator, device=w.device)
        bits |= torch.randint(0, 2, w.shape, generator=generator, device=w.device) << 7
        w.copy_(bits.to(torch.uint8).view(FP8_DTYPE))
        module.weight_scale.fill_(magnitude / 448.0)
    else:
        raise TypeError(f"not a quantized linear layer: {type(module).__name__}")
    if module.bias is not None:
        module.bias.uniform_(-magnitude, magnitude, generator=generator)


def quantize_float(
    config: QuantConfig,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pre_quant_scale: torch.Tensor | None = None,
    input_amax: float | None = None,
) -> nn.Module:
    """Quantize a float ``[out, in]`` weight (already smoothed, if calibrated).

    ``pre_quant_scale`` (``[in]``) is stored in the layer and multiplies its input;
    ``input_amax`` gives FP8 ``activation_scheme="static"`` its input scale.
    """
    algo = config.quant_algo
    dtype = bias.dtype if bias is not None else weight.dtype
    out_features, in_features = weight.shape
    layer = empty_quantized_linear(
        config, in_features, out_features, bias is not None, dtype, pre_quant_scale is not None
    )
    if algo in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN):
        per_channel = algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN
        q, scale = (quantize_fp8_per_channel if per_channel else quantize_fp8_per_tensor)(weight)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if layer.input_scale is not None:
            if input_amax is None:
                raise ValueError("FP8 activation_scheme='static' needs calibrated input_amax")
            layer.input_scale.data.fill_(input_amax / 448.0 if input_amax > 0 else 1.0)
    elif isinstance(layer, WeightOnlyGroupwiseLinear):
        bits, group = layer.bits, layer.group_size
        if config.has_zero_point:
            q, scale, zero = quantize_groupwise_asymmetric(weight, group, bits)
        else:
            signed, scale = quantize_groupwise_symmetric(weight, group, bits)
            q = (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
            zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.int32)
        layer._load(GroupwiseWeights(q, zero, scale), None, None)
    else:  # int8 per channel: W8A16 and SmoothQuant
        q, scale = quantize_int8_per_channel(weight)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
    if pre_quant_scale is not None:
        layer.pre_quant_scale.data.copy_(pre_quant_scale)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _shared(parts: list[torch.Tensor | None], name: str) -> torch.Tensor | None:
    """A per-input tensor all shards of a fused layer must agree on (they share x)."""
    first = parts[0]
    if first is None:
        if any(p is not None for p in parts):
            raise ValueError(f"{name} is given for only some shards of a fused layer")
        return None
    if not all(p is not None and torch.equal(p, first) for p in parts):
        raise ValueError(f"shards of a fused layer have different {name}s")
    return first


def _int_layout(config: QuantConfig, shards: list[dict[str, torch.Tensor]]) -> GroupwiseWeights:
    """rtllm internal layout; int8 (signed symmetric) codes are shifted to unsigned."""
    qs, zeros = [], []
    for t in shards:
        q = t["weight"]
        if q.dtype == torch.int8:
            q = (q.to(torch.int16) + 128).to(torch.uint8)
            zero = torch.full(t["weight_scale"].shape, 128, dtype=torch.int32, device=q.device)
        else:
            zero = t["weight_zero"]
        qs.append(q)
        zeros.append(zero)
    zero = _cat(zeros) if len({z.dtype for z in zeros}) == 1 else _cat([z.float() for z in zeros])
    return GroupwiseWeights(_cat(qs), zero, _cat([t["weight_scale"].float() for t in shards]))


def build_from_staged(
    config: QuantConfig,
    staged: dict[object, dict[str, torch.Tensor]],
    shard_ids: list[object],
    dtype: torch.dtype,
    module_name: str = "<linear>",
) -> nn.Module:
    """Build the quantized layer from the staged checkpoint tensors of every shard.

    Raises:
        ValueError: a shard or one of its tensors is missing, or shapes disagree.
    """
    missing = [s for s in shard_ids if s not in staged]
    if missing:
        raise ValueError(f"{module_name}: checkpoint is missing shards {missing}")
    shards = [staged[s] for s in shard_ids]
    biases = [t.get("bias") for t in shards]
    bias = None if biases[0] is None else _cat([b.to(dtype) for b in biases])
    first = shards[0]
    algo = config.quant_algo
    try:
        if "qweight" in first:
            parts = []
            for t in shards:
                if algo == QuantAlgo.W4A16_AWQ:
                    parts.append(unpack_awq(t["qweight"], t["qzeros"], t["scales"]))
                elif algo in (QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ):
                    bits = _BITS[algo]
                    g_idx = t.get("g_idx")
                    parts.append(unpack_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, bits))
                else:
                    raise ValueError(f"packed 'qweight' tensors need an AWQ or GPTQ config, not {algo}")
            weights = GroupwiseWeights(*(_cat(list(field)) for field in zip(*parts, strict=True)))
            bits = 4 if algo != QuantAlgo.W8A16_GPTQ else 8
            pqs = _shared([t.get("pre_quant_scale") for t in shards], "pre_quant_scale")
            return WeightOnlyGroupwiseLinear.from_quantized(weights, bias, bits, pqs, dtype)
        weight = first["weight"]
        if weight.dtype == FP8_DTYPE:
            return _fp8_from_staged(config, shards, bias, dtype)
        if weight.is_floating_point():
            return quantize_float(config, _cat([t["weight"].to(dtype) for t in shards]), bias)
        return _int_from_staged(config, shards, bias, dtype)
    except KeyError as exc:
        raise ValueError(f"{module_name}: checkpoint lacks tensor {exc.args[0]!r}") from None


def _fp8_from_staged(
    config: QuantConfig,
    shards: list[dict[str, torch.Tensor]],
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> nn.Module:
    # Each shard has its own per-tensor scale: a fused layer holds them as a per-row
    # scale (exact). Shards share their input, so a static input scale is their max.
    weight = _cat([t["weight"] for t in shards])
    out_features, in_features = weight.shape
    scales = [t["weight_scale"].float() for t in shards]
    per_row = len(shards) > 1 or scales[0].numel() > 1
    inputs = [t.get("input_scale") for t in shards]
    static = inputs[0] is not None
    layer = Fp8Linear(in_features, out_features, bias is not None, per_row, static, dtype)
    layer.weight.data.copy_(weight)
    if per_row:
        rows = [
            s.reshape(-1, 1).expand(t["weight"].shape[0], 1)
            for s, t in zip(scales, shards, strict=True)
        ]
        layer.weight_scale.data.copy_(_cat(rows))
    else:
        layer.weight_scale.data.copy_(scales[0].reshape(()))
    if static:
        layer.input_scale.data.fill_(max(float(s.float().max()) for s in inputs))
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def _int_from_staged(
    config: QuantConfig,
    shards: list[dict[str, torch.Tensor]],
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> nn.Module:
    first = shards[0]
    pqs = _shared([t.get("pre_quant_scale") for t in shards], "pre_quant_scale")
    per_channel = first["weight_scale"].dim() == 2 and first["weight_scale"].shape[1] == 1
    plain_int8 = first["weight"].dtype == torch.int8 and per_channel
    if config.quant_algo == QuantAlgo.W8A8_SQ_PER_CHANNEL or (
        config.quant_algo == QuantAlgo.W8A16 and plain_int8
    ):
        if not plain_int8:
            raise ValueError(f"{config.quant_algo} needs int8 weights with [out, 1] scales")
        weight = _cat([t["weight"] for t in shards])
        layer = empty_quantized_linear(
            config, weight.shape[1], weight.shape[0], bias is not None, dtype, pqs is not None
        )
        layer.weight.data.copy_(weight)
        layer.weight_scale.data.copy_(_cat([t["weight_scale"].float() for t in shards]))
        if pqs is not None:
            layer.pre_quant_scale.data.copy_(pqs)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer
    weights = _int_layout(config, shards)
    # Per layer (GGUF files mix Q8_0 and Q4 tensors): signed int8 codes are 8-bit, and
    # 4-bit codes fused with them are valid 8-bit codes with the same zero.
    any_int8 = any(t["weight"].dtype == torch.int8 for t in shards)
    bits = 8 if any_int8 else _BITS.get(config.quant_algo, 4)
    return WeightOnlyGroupwiseLinear.from_quantized(weights, bias, bits, pqs, dtype)
