"""Write a quantized Hugging Face-style checkpoint (what ``rtllm quantize`` does).

Output directory: ``model.safetensors``, ``config.json`` with ``quantization_config``,
the tokenizer files and ``generation_config.json`` when the source has one;
``LLM(model=DIR)`` loads it with no further flags. Linear weights are written per
checkpoint module (``q_proj``, ``k_proj``, ... unfused), everything else (embeddings,
norms, ``lm_head``) in the source's float dtype. Formats by ``qformat``:

=============  ===========================================================================
``w4a16_awq``  AutoAWQ GEMM (``quant_method: awq``): ``qweight``/``qzeros``/``scales``,
               int4 with zero point, groups of ``group_size`` (default 128, or 64 when
               128 does not divide every layer's input); AWQ scales calibrated and all
               folded (norms, ``v`` rows, ``up`` rows), so no extra tensors
``w4a16``      GPTQ v1 (``quant_method: gptq``, ``bits: 4``, ``group_size: -1``,
               ``sym: true``, ``desc_act: false``): TRT-LLM's W4A16, int4 per channel
``w8a16``      GPTQ v1 with ``bits: 8``, ``group_size: -1``, ``sym: true``: int8 per channel
``fp8``        HF FP8 (``quant_method: fp8``, ``activation_scheme: dynamic``): float8_e4m3fn
               ``weight`` and a per-tensor float32 ``weight_scale`` per module; rounded
               with GPTQ on calibration data (``fp8_weight_rounding``, default
               ``gptq``; ``--fp8-weight-rounding nearest``: round-to-nearest)
``w8a8_sq``    rtllm's own (``quant_method: rtllm``, ``quant_algo: W8A8_SQ_PER_CHANNEL``):
               int8 ``weight`` ``[out, in]`` (smoothed), float32 ``weight_scale``
               ``[out, 1]``, and for ``o_proj``/``down_proj`` float32 ``pre_quant_scale``
               ``[in]`` (the input multiplier; qkv/gate_up scales are in the norms)
=============  ===========================================================================

``kv_cache_dtype`` is recorded as ``kv_cache_quant_algo`` in ``quantization_config``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from typing import Any

import torch

from rtllm.quantization.config import QuantAlgo, QuantConfig
from rtllm.quantization.packing import pack_awq, pack_gptq
from rtllm.quantization.rtn import (
    quantize_fp8_per_tensor,
    quantize_groupwise_asymmetric,
    quantize_groupwise_symmetric,
    quantize_int8_per_channel,
)

logger = logging.getLogger(__name__)

QFORMATS: dict[str, QuantConfig] = {
    "w4a16_awq": QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ, has_zero_point=True),
    "w4a16": QuantConfig(quant_algo=QuantAlgo.W4A16),
    "w8a16": QuantConfig(quant_algo=QuantAlgo.W8A16),
    "fp8": QuantConfig(quant_algo=QuantAlgo.FP8),
    "w8a8_sq": QuantConfig(quant_algo=QuantAlgo.W8A8_SQ_PER_CHANNEL),
}
KV_CACHE_DTYPES = {"fp8": QuantAlgo.FP8, "int8": QuantAlgo.INT8}


def export_config(
    qformat: str,
    kv_cache_dtype: str | None = None,
    group_size: int | None = None,
    fp8_weight_rounding: str | None = None,
    **calib: Any,
) -> QuantConfig:
    """The :class:`QuantConfig` of ``qformat`` (``ValueError`` names allowed values)."""
    if qformat not in QFORMATS:
        raise ValueError(f"qformat must be one of {', '.join(QFORMATS)}; got {qformat!r}")
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of fp8, int8; got {kv_cache_dtype!r}")
    changes: dict[str, Any] = {k: v for k, v in calib.items() if v is not None}
    if kv_cache_dtype is not None:
        changes["kv_cache_quant_algo"] = KV_CACHE_DTYPES[kv_cache_dtype]
    if group_size is not None:
        if qformat != "w4a16_awq":
            raise ValueError(f"group_size applies to w4a16_awq only, not {qformat}")
        changes["group_size"] = group_size
    if fp8_weight_rounding is not None:
        if qformat != "fp8":
            raise ValueError(f"fp8_weight_rounding applies to fp8 only, not {qformat}")
        changes["fp8_weight_rounding"] = fp8_weight_rounding
    return replace(QFORMATS[qformat], **changes)


def _pick_group_size(config: QuantConfig, in_sizes: set[int], explicit: bool) -> QuantConfig:
    if config.quant_algo != QuantAlgo.W4A16_AWQ or explicit:
        return config
    for group in (128, 64):
        if all(n % group == 0 for n in in_sizes):
            return replace(config, group_size=group)
    raise ValueError(f"no AWQ group size (128, 64) divides the input sizes {sorted(in_sizes)}")


def _quantize_module(
    config: QuantConfig, w: torch.Tensor, pre_quant_scale: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """One checkpoint module's tensors in the format of ``config`` (see module doc)."""
    algo = config.quant_algo
    if algo == QuantAlgo.W4A16_AWQ:
        q, scale, zero = quantize_groupwise_asymmetric(w, config.group_size, 4)
        return dict(pack_awq(q, zero, scale)._asdict())
    if algo in (QuantAlgo.W4A16, QuantAlgo.W8A16):
        bits = 4 if algo == QuantAlgo.W4A16 else 8
        if bits == 4:
            signed, scale = quantize_groupwise_symmetric(w, -1, 4)
        else:
            signed, scale = quantize_int8_per_channel(w)
        offset = 1 << (bits - 1)
        q = (signed.to(torch.int16) + offset).to(torch.uint8)
        zero = torch.full_like(scale, offset, dtype=torch.int32)
        return dict(pack_gptq(q, zero, scale, bits)._asdict())
    if algo == QuantAlgo.FP8:
        q, scale = quantize_fp8_per_tensor(w)
        return {"weight": q, "weight_scale": scale}
    q, scale = quantize_int8_per_channel(w)
    out = {"weight": q, "weight_scale": scale}
    if pre_quant_scale is not None:
        out["pre_quant_scale"] = pre_quant_scale.float()
    return out


def _hf_config(model_path: str) -> dict[str, Any]:
    if os.path.isdir(model_path):
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f)
    from rtllm.models.gguf_loader import read_gguf_config

    return read_gguf_config(model_path)


@torch.no_grad()
def quantize_checkpoint(model_path: str, output_dir: str, config: QuantConfig,
                        explicit_group_size: bool = False) -> QuantConfig:
    """Quantize the float model at ``model_path`` (HF directory or GGUF file) into
    ``output_dir`` (created; must not exist or be empty). Returns the config written."""
    from safetensors.torch import save_file

    from rtllm.layers.linear import Linear
    from rtllm.llmapi.tokenizer import load_tokenizer
    from rtllm.models.loader import build_model, load_model_config
    from rtllm.quantization.calibration import calibration_samples, collect_activation_stats
    from rtllm.quantization.linear_method import needs_calibration
    from rtllm.quantization.smoothing import (
        LayerCalibration,
        calibrate_sequentially,
        needs_sequential_calibration,
        smooth_model,
    )

    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"output directory {output_dir!r} is not empty")
    model_config = load_model_config(model_path)
    model = build_model(model_path, model_config, torch.float32, torch.device("cpu"))
    linears = {m.prefix: m for m in model.modules()
               if isinstance(m, Linear) and m.prefix.startswith("model.layers.")}
    config = _pick_group_size(config, {m.in_features for m in linears.values()}, explicit_group_size)
    tokenizer = load_tokenizer(model_path)
    calib: dict[str, LayerCalibration] = {}
    if needs_calibration(config):
        samples = calibration_samples(tokenizer, config)
        if needs_sequential_calibration(config):  # AWQ + GPTQ, GPTQ: weights left on their grid
            # FP8: written with one per-tensor scale per checkpoint module (shard).
            calib = calibrate_sequentially(model, config, samples, linears, fp8_shard_scales=True)
        else:
            calib = smooth_model(model, config, collect_activation_stats(model, samples, linears))
    float_dtype = model_config.checkpoint_dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if module_name in linears:
            continue
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            continue
        tensors[name] = param.detach().to(float_dtype).contiguous()
    for prefix, linear in linears.items():
        parent = prefix.rpartition(".")[0]
        pqs = calib.get(prefix, LayerCalibration()).pre_quant_scale
        for shard, ckpt_name in zip(linear.shard_ids(), linear.checkpoint_names(), strict=True):
            start, size = linear.shard_rows(shard)
            name = ckpt_name if ckpt_name != prefix or shard is None else f"{parent}.{shard}"
            for suffix, t in _quantize_module(config, linear.weight[start:start + size], pqs).items():
                tensors[f"{name}.{suffix}"] = t.contiguous()
            if linear.bias is not None:
                tensors[f"{name}.bias"] = linear.bias[start:start + size].to(float_dtype).contiguous()
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    if config.quant_algo in (QuantAlgo.W4A16, QuantAlgo.W8A16):  # written in GPTQ's layout
        gptq = QuantAlgo.W4A16_GPTQ if config.quant_algo == QuantAlgo.W4A16 else QuantAlgo.W8A16_GPTQ
        config = replace(config, quant_algo=gptq, group_size=-1, has_zero_point=False)
    hf = _hf_config(model_path)
    hf["quantization_config"] = config.to_checkpoint_quantization_config()
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tokenizer.save_pretrained(output_dir)
    if os.path.isdir(model_path) and os.path.isfile(os.path.join(model_path, "generation_config.json")):
        shutil.copy(os.path.join(model_path, "generation_config.json"), output_dir)
    logger.info("wrote %s (%s) to %s", config.quant_algo, len(tensors), output_dir)
    return config
