"""Builds a model and fills its weights from a Hugging Face directory, a GGUF file,
or random values (``load_format="dummy"``).

With a :class:`~rtllm.quantization.QuantConfig` the decoder's linear layers are
quantized: float checkpoints are quantized on load (each layer as soon as its last
shard arrives; AWQ / SmoothQuant / static FP8 first calibrate the whole float model),
pre-quantized checkpoints (AWQ, GPTQ, FP8, rtllm) are unpacked, GGUF files can keep
their Q4/Q8 blocks (``QuantConfig.from_gguf()``) and dummy weights are drawn directly
in the quantized dtypes. See :mod:`rtllm.layers.linear` for a layer's life cycle."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from rtllm.layers.linear import Linear
from rtllm.models.config import ModelConfig
from rtllm.models.registry import resolve_model_class
from rtllm.quantization.config import QuantConfig

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


def is_gguf(path: str) -> bool:
    """True when ``path`` names a GGUF file."""
    return os.path.isfile(path) and path.endswith(".gguf")


def load_model_config(path: str) -> ModelConfig:
    """Read the model config of a Hugging Face directory, a ``config.json`` or a GGUF file."""
    if is_gguf(path):
        from rtllm.models.gguf_loader import read_gguf_config

        return ModelConfig.from_dict(read_gguf_config(path))
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        path = os.path.dirname(path) or "."
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"model must be a Hugging Face directory or a .gguf file, got {path!r}")
    config = ModelConfig.from_pretrained(path)
    generation_config = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config):
        # Llama 3 lists several end-of-turn tokens here rather than in config.json.
        with open(generation_config) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            ids = tuple(eos) if isinstance(eos, list) else (eos,)
            merged = tuple(dict.fromkeys(config.eos_token_ids + ids))
            config = _replace_eos(config, merged)
    return config


def _replace_eos(config: ModelConfig, eos_ids: tuple[int, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(config, eos_token_ids=eos_ids)


def iter_safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from every safetensors shard of ``model_dir``."""
    from safetensors import safe_open

    for file in _safetensors_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


class LazyTensor:
    """A safetensors tensor read on demand: whole (:meth:`materialize`) or a range of one
    dimension (:meth:`narrow`, same signature as ``torch.Tensor.narrow``), so a
    tensor-parallel rank reads only its own rows or columns from disk."""

    def __init__(self, checkpoint_slice: Any) -> None:
        self._slice = checkpoint_slice
        self.shape = tuple(checkpoint_slice.get_shape())

    def materialize(self) -> torch.Tensor:
        return self._slice[...]  # (``[:]`` fails on 0-dim tensors such as per-tensor scales)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]


def _safetensors_files(model_dir: str) -> list[str]:
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, name) for name in shard_names]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"safetensors shards listed in {index_path} are missing: {missing}")
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights found in {model_dir}")
    return files


def iter_safetensors_slices(model_dir: str) -> Iterator[tuple[str, LazyTensor]]:
    """Yield ``(name, LazyTensor)`` for every checkpoint tensor; nothing is read until the
    consumer narrows or materialises it (tensor/pipeline-parallel loading)."""
    from safetensors import safe_open

    for file in _safetensors_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, LazyTensor(f.get_slice(name))


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | LazyTensor]]) -> None:
    """Copy checkpoint tensors (Hugging Face names) into ``model``'s parameters.

    Fused parameters are found through the model's ``packed_modules_mapping``.
    Raises if a parameter is left unloaded or a checkpoint tensor has no home.
    :class:`LazyTensor` weights reach loaders of parameters marked ``takes_slices``
    as they are (the loader reads its shard); others are read whole. A model with
    ``owns_checkpoint_tensor(name)`` (a pipeline stage) skips tensors of other stages
    without reading them.
    """
    params = dict(model.named_parameters())
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear) and m.is_quantized}
    packed = getattr(model, "packed_modules_mapping", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    owns = getattr(model, "owns_checkpoint_tensor", None)
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if owns is not None and not owns(name):
            continue  # another pipeline stage's tensor
        if tied and name == "lm_head.weight":
            continue  # the embedding is the head
        shard_id: object = None
        target = name
        for source, (fused, shard) in packed.items():
            if f".{source}." in name:
                target, shard_id = name.replace(f".{source}.", f".{fused}."), shard
                break
        module_name, _, suffix = target.rpartition(".")
        if module_name in quantized:
            if isinstance(tensor, LazyTensor) and not getattr(quantized[module_name], "stages_slices", False):
                tensor = tensor.materialize()
            # Quantized layers stage every checkpoint tensor (float or packed) themselves.
            quantized[module_name].load_checkpoint_tensor(suffix, tensor, shard_id)
            continue
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        loader = getattr(param, "weight_loader", None)
        if isinstance(tensor, LazyTensor):
            if loader is not None and getattr(param, "takes_slices", False):
                loader(param, tensor, shard_id)
                loaded.add(target if shard_id is None else f"{target}#{shard_id}")
                continue
            tensor = tensor.materialize()
        tensor = tensor.to(param.dtype)
        if loader is None:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: parameter {tuple(param.shape)} vs checkpoint {tuple(tensor.shape)}")
            param.data.copy_(tensor)
        else:
            loader(param, tensor, shard_id)
        loaded.add(target if shard_id is None else f"{target}#{shard_id}")
    expected = _expected_loads(model, params, packed)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")
    for module in quantized.values():
        module.process_weights_after_loading()


def _expected_loads(
    model: nn.Module, params: dict[str, nn.Parameter], packed: dict[str, tuple[str, object]]
) -> set[str]:
    shards_of: dict[str, list[object]] = {}
    for fused, shard in packed.values():
        shards_of.setdefault(fused, []).append(shard)
    expected: set[str] = set()
    for name in params:
        module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if module_name in shards_of:
            expected.update(f"{name}#{shard}" for shard in shards_of[module_name])
        else:
            expected.add(name)
    return expected


def _instantiate(config: ModelConfig, quant_config: QuantConfig | None) -> nn.Module:
    cls = resolve_model_class(config)
    return cls(config) if quant_config is None else cls(config, quant_config=quant_config)


def estimate_weight_bytes(
    config: ModelConfig, dtype: torch.dtype, quant_config: QuantConfig | None = None
) -> int:
    """Bytes of the model's parameters in ``dtype`` (quantized layers at their quantized
    size), counted without allocating them."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = _instantiate(config, quant_config)
            for module in model.modules():
                if isinstance(module, Linear) and module.is_quantized:
                    _init_empty_quantized(module)
    finally:
        torch.set_default_dtype(default_dtype)
    return sum(p.numel() * p.dtype.itemsize for p in model.parameters())


def _init_empty_quantized(module: Linear) -> None:
    from rtllm.quantization.linear_method import empty_quantized_linear, holds_pre_quant_scale

    pre_quant_scale = holds_pre_quant_scale(module.quant_config, module.prefix)
    module.quant = empty_quantized_linear(
        module.quant_config, module.in_features, module.out_features, module.has_bias,
        torch.get_default_dtype(), pre_quant_scale,
    )


def _fill_dummy(model: nn.Module, device: torch.device, seed: int) -> None:
    # Random values drawn on the model's device (fast for multi-GB models), seeded.
    # Quantized layers draw their codes directly: no float copy of them is ever made.
    generator = torch.Generator(device=device).manual_seed(seed)
    for param in model.parameters():
        param.data.uniform_(-0.05, 0.05, generator=generator)
    for module in model.modules():
        if isinstance(module, Linear) and module.is_quantized:
            module.init_dummy(generator)


def build_model(
    model_path: str,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    seed: int = 0,
    quant_config: QuantConfig | None = None,
) -> nn.Module:
    """Instantiate the model for ``config`` on ``device`` and fill its weights.

    ``quant_config`` quantizes the linears; a pre-quantized checkpoint's own
    ``quantization_config`` is used (see
    :func:`rtllm.quantization.checkpoint.resolve_quant_config`).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    start = time.perf_counter()
    from rtllm.quantization.checkpoint import resolve_quant_config

    quant_config = resolve_quant_config(model_path, quant_config)  # a no-op when resolved
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = _instantiate(config, quant_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if load_format == "dummy":
        _fill_dummy(model, device, seed)
    elif is_gguf(model_path):
        from rtllm.distributed.parallel_state import get_mapping
        from rtllm.models.gguf_loader import iter_gguf_weights

        if get_mapping().world_size > 1:
            raise NotImplementedError(
                "GGUF models under tensor/pipeline parallelism are not supported yet; "
                "use a safetensors checkpoint"
            )

        keep = quant_config is not None and quant_config.keep_gguf_quantized
        load_weights(model, iter_gguf_weights(model_path, keep_quantized=keep))
    else:
        if quant_config is not None and quant_config.keep_gguf_quantized:
            raise ValueError("QuantConfig.from_gguf() (keep_gguf_quantized) needs a .gguf model")
        from rtllm.distributed.parallel_state import get_mapping

        # A parallel rank reads only its own slices (and stage) of each tensor.
        sliced = get_mapping().world_size > 1
        load_weights(model, iter_safetensors_slices(model_path) if sliced else iter_safetensors_weights(model_path))
    if any(isinstance(m, Linear) and m.awaiting_calibration for m in model.modules()):
        from rtllm.quantization.smoothing import calibrate_and_quantize

        calibrate_and_quantize(model, quant_config, model_path)
    model.eval()
    logger.info("loaded %s (%s, %s) in %.2f s", config.architecture, dtype, device, time.perf_counter() - start)
    return model
