"""The overlap loop (launch step N before committing N-1) gives exactly the output
of the synchronous loop, on CPU, for every way a request can end."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtllm import LLM, KvCacheConfig, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("overlap_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _llm(model_dir: str, overlap: bool, **kwargs) -> LLM:
    return LLM(
        model_dir,
        skip_tokenizer_init=True,
        disable_overlap_scheduler=not overlap,
        kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=1024),
        **kwargs,
    )


PROMPTS = [[5, 6, 7], list(range(20, 45)), [9], list(range(100, 112))]


def _run(llm: LLM) -> list[tuple[list[int], str]]:
    params = [
        SamplingParams(max_tokens=17, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=1.0, top_k=5, seed=11, ignore_eos=True),
    ]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


@pytest.mark.parametrize("engine_kwargs", [{}, {"max_num_tokens": 16, "enable_chunked_prefill": True}])
def test_overlap_matches_sync(model_dir, engine_kwargs):
    with _llm(model_dir, overlap=False, **engine_kwargs) as sync_llm:
        expected = _run(sync_llm)
    with _llm(model_dir, overlap=True, **engine_kwargs) as overlap_llm:
        assert overlap_llm.executor.engine.overlap
        got = _run(overlap_llm)
        engine = overlap_llm.executor.engine
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert got == expected
    assert [len(t) for t, _ in got] == [17, 30, 40, 25]


def test_overlap_stop_token_drops_the_extra_step(model_dir):
    with _llm(model_dir, overlap=False) as sync_llm:
        base = sync_llm.generate(PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True)).outputs[0].token_ids
    stop_token = base[10]
    first = base.index(stop_token)
    with _llm(model_dir, overlap=True) as llm:
        out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=30, stop_token_ids=[stop_token]))
        engine = llm.executor.engine
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
        assert not engine.has_work
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids == base[: first + 1]


def test_overlap_abort_frees_blocks(model_dir):
    with _llm(model_dir, overlap=True) as llm:
        result = llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), streaming=True)
        seen = 0
        for out in result:
            seen += len(out.outputs[0].token_ids_diff)
            if seen >= 5:
                out.abort()
        assert result.outputs[0].finish_reason == "cancelled"
        engine = llm.executor.engine
        done = threading.Event()
        for _ in range(100):
            if engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks:
                done.set()
                break
            threading.Event().wait(0.05)
        assert done.is_set()
        # Every token handed out is real (no placeholder leaked).
        assert all(t >= 0 for t in result.outputs[0].token_ids)
