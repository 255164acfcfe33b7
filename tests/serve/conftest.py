"""Fixtures of the server tests (helpers live in ``serve_helpers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from serve_helpers import make_llm, save_tiny_model

from rtllm import LLM


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # OpenMP threads spinning against a busy 2-core machine make steps much slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory with a tiny random Llama and its tokenizer (with a chat template)."""
    path = tmp_path_factory.mktemp("tiny_llama_tok")
    save_tiny_model(str(path))
    return str(path)


@pytest.fixture(scope="session")
def llm(model_dir: str) -> Iterator[LLM]:
    """The LLM shared by the tests that do not disturb the engine."""
    llm = make_llm(model_dir)
    yield llm
    llm.shutdown()
