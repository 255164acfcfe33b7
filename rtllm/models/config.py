"""The model shape rtllm needs, read from a Hugging Face config or GGUF metadata.

Models take a :class:`ModelConfig`, never a transformers config object, so that
transformers' own config changes (``rope_theta`` moving into ``rope_parameters``
in transformers 5, say) are handled in this one place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture and shape of a decoder-only model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    checkpoint_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act={self.hidden_act!r} is not supported (only 'silu')")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dictionary (any transformers version)."""
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError("config has no 'architectures' entry; cannot tell which model to build")
        architecture = architectures[0]
        num_heads = config["num_attention_heads"]
        hidden_size = config["hidden_size"]
        rope_params = dict(config.get("rope_parameters") or {})
        rope_scaling = config.get("rope_scaling") or None
        rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type == "default":
                rope_scaling = None
            elif rope_type != "llama3":
                raise NotImplementedError(
                    f"rope_scaling type {rope_type!r} is not supported (supported: llama3)"
                )
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        model_type = config.get("model_type", "")
        attention_bias = bool(config.get("attention_bias", False))
        # Qwen2 has biases on q/k/v but not on o_proj; Llama's attention_bias covers all four.
        output_bias = attention_bias
        if model_type == "qwen2":
            attention_bias, output_bias = True, False
        sliding_window = None
        if model_type == "mistral":
            sliding_window = config.get("sliding_window")
        elif model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
            raise NotImplementedError(f"use_sliding_window=True is not supported for {model_type}")
        dtype_name = config.get("torch_dtype") or config.get("dtype") or "float32"
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            attention_bias=attention_bias,
            attention_output_bias=output_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            hidden_act=config.get("hidden_act", "silu"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=_DTYPE_NAMES.get(str(dtype_name).replace("torch.", ""), torch.float32),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> ModelConfig:
        """Read ``config.json`` from a Hugging Face model directory."""
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir} has no config.json; it is not a Hugging Face model directory")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes over all layers, per byte of element size."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
