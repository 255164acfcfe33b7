"""Tiny random Llama checkpoints (transformers-made, safetensors) with a byte-level
tokenizer, shared by the quantization model tests."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = 256


def make_tiny_llama(
    path: Path, tokenizer: Any, seed: int = 0, outliers: bool = True, **overrides: Any
) -> Any:
    """Save a seeded random Llama (GQA 4/2 heads, hidden 128) plus ``tokenizer`` at ``path``.

    ``outliers`` scales a few RMSNorm channels by 20, giving the linear inputs the
    per-channel activation outliers of real LLMs that AWQ and SmoothQuant address.
    Returns the transformers model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.08, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    if outliers:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                    p[torch.randperm(p.numel(), generator=gen)[:4]] *= 20.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_llama_factory(byte_tokenizer: Any) -> Any:
    """:func:`make_tiny_llama` (with the byte-level tokenizer) for tests that need their
    own checkpoint."""
    return functools.partial(make_tiny_llama, tokenizer=byte_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer: Any) -> tuple[str, Any]:
    """(directory, transformers model) of the shared tiny float checkpoint."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama(path, byte_tokenizer)
    return str(path), model
