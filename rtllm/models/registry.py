"""Maps ``config.json`` ``architectures`` names to rtllm model classes."""

from __future__ import annotations

from torch import nn

from rtllm.models.config import ModelConfig
from rtllm.models.llama import LlamaForCausalLM

# Mistral, Qwen2 and Qwen3 differ from Llama only in flags that ModelConfig reads
# from their config (sliding window, qkv bias, q/k norm).
_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    """Names accepted in ``config.json``'s ``architectures``."""
    return sorted(_MODEL_CLASSES)


def resolve_model_class(config: ModelConfig) -> type[nn.Module]:
    """The class implementing ``config.architecture``; raises for unknown ones."""
    cls = _MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise ValueError(
            f"unsupported model architecture {config.architecture!r}; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return cls
