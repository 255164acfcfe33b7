"""Fixtures of the server tests (helpers live in ``serve_helpers``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from serve_helpers import SERVED_NAME, make_llm, save_tiny_model

from rtllm import LLM
from rtllm.serve import build_app


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


@pytest.fixture(scope="module")
def app(llm: LLM) -> Any:
    """The server app over the shared LLM (its own metrics registry per test module)."""
    return build_app(llm, SERVED_NAME)


@pytest.fixture
def submissions(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every request that got into the executor's inbox during the test."""
    accepted: list[Any] = []
    executor = llm.executor
    original = executor.submit

    def spy(request: Any) -> Any:
        result = original(request)
        accepted.append(request)
        return result

    monkeypatch.setattr(executor, "submit", spy)
    yield accepted
