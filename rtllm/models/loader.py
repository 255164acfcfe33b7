"""Builds a model and fills its weights from a Hugging Face directory, a GGUF file,
or random values (``load_format="dummy"``)."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rtllm.models.config import ModelConfig
from rtllm.models.registry import resolve_model_class

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
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors (Hugging Face names) into ``model``'s parameters.

    Fused parameters are found through the model's ``packed_modules_mapping``.
    Raises if a parameter is left unloaded or a checkpoint tensor has no home.
    """
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if tied and name == "lm_head.weight":
            continue  # the embedding is the head
        shard_id: object = None
        target = name
        for source, (fused, shard) in packed.items():
            if f".{source}." in name:
                target, shard_id = name.replace(f".{source}.", f".{fused}."), shard
                break
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        loader = getattr(param, "weight_loader", None)
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


def estimate_weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in ``dtype``, counted without allocating them."""
    with torch.device("meta"):
        model = resolve_model_class(config)(config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def build_model(
    model_path: str,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """Instantiate the model for ``config`` on ``device`` and fill its weights."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    start = time.perf_counter()
    cls = resolve_model_class(config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if load_format == "dummy":
        # Random values drawn on the model's device (fast for multi-GB models), seeded.
        generator = torch.Generator(device=device).manual_seed(seed)
        for param in model.parameters():
            param.data.uniform_(-0.05, 0.05, generator=generator)
    elif is_gguf(model_path):
        from rtllm.models.gguf_loader import iter_gguf_weights

        load_weights(model, iter_gguf_weights(model_path))
    else:
        load_weights(model, iter_safetensors_weights(model_path))
    model.eval()
    logger.info("loaded %s (%s, %s) in %.2f s", config.architecture, dtype, device, time.perf_counter() - start)
    return model
