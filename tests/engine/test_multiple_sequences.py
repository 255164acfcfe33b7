"""``n`` and ``best_of``: sequences of one prompt share its KV (computed once, the last
partial block copied on write) and each equals the standalone request it stands for."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtllm import LLM, KvCacheConfig, SamplingParams

PROMPT = list(range(1, 20))  # 19 tokens: two full blocks of 8 and a partial one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("nseq_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def llm(model_dir, request):
    with LLM(model_dir, skip_tokenizer_init=True, disable_overlap_scheduler=not request.param,
             kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=1024, enable_block_reuse=False)) as llm:
        yield llm


def count_tokens(llm: LLM) -> list[int]:
    runner = llm.executor.engine.runner
    counted: list[int] = []
    original = runner.execute

    def counting(scheduled, *args, **kwargs):
        counted.append(sum(item.num_new_tokens for item in scheduled))
        return original(scheduled, *args, **kwargs)

    runner.execute = counting
    return counted


def test_each_sequence_equals_its_standalone_request(llm) -> None:
    counted = count_tokens(llm)
    params = SamplingParams(max_tokens=7, n=3, temperature=1.0, seed=40)
    out = llm.generate(PROMPT, params)
    assert sum(counted) == len(PROMPT) + 3 * 6  # the prompt ran once, not three times
    del llm.executor.engine.runner.execute
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for index, output in enumerate(out.outputs):
        alone = llm.generate(PROMPT, SamplingParams(max_tokens=7, temperature=1.0, seed=40 + index))
        assert output.token_ids == alone.outputs[0].token_ids
        assert output.finish_reason == "length"
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    kv = llm.executor.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and not llm.executor.engine.groups


def test_forked_sequences_share_full_blocks_and_copy_the_partial_one(llm) -> None:
    engine = llm.executor.engine
    tables: list[list[list[int]]] = []
    original = engine.runner.execute

    def spy(scheduled, block_table_of, *args, **kwargs):
        tables.append([list(block_table_of(item.request.request_id)) for item in scheduled])
        return original(scheduled, block_table_of, *args, **kwargs)

    engine.runner.execute = spy
    llm.generate(PROMPT, SamplingParams(max_tokens=4, n=3, temperature=0))
    del engine.runner.execute
    first_generation = tables[1]  # the step after the prompt: three sequences
    assert len(first_generation) == 3
    prefixes = {tuple(t[:2]) for t in first_generation}
    assert len(prefixes) == 1  # the two full prompt blocks are shared
    assert len({t[2] for t in first_generation}) == 3  # each has its own copy of the partial block


def test_best_of_returns_the_n_best_by_cumulative_logprob(llm) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=6, n=2, best_of=4, temperature=1.0, seed=7, logprobs=0))
    assert len(out.outputs) == 2 and [o.index for o in out.outputs] == [0, 1]
    candidates = []
    for index in range(4):
        alone = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=1.0, seed=7 + index, logprobs=0))
        candidates.append((alone.outputs[0].cumulative_logprob, alone.outputs[0].token_ids))
    best = sorted(candidates, key=lambda c: -c[0])[:2]
    assert [o.token_ids for o in out.outputs] == [b[1] for b in best]
    for output, (score, _) in zip(out.outputs, best, strict=True):
        assert abs(output.cumulative_logprob - score) < 1e-4


def test_streaming_several_sequences(llm) -> None:
    seen: dict[int, list[int]] = {0: [], 1: []}
    result = llm.generate_async(PROMPT, SamplingParams(max_tokens=5, n=2, temperature=1.0, seed=3), streaming=True)
    for step in result:
        for output in step.outputs:
            seen[output.index] += output.token_ids_diff
    assert result.finished
    assert [seen[0], seen[1]] == [o.token_ids for o in result.outputs]
    assert all(len(o.token_ids) == 5 for o in result.outputs)


def test_abort_frees_every_sequence(llm) -> None:
    engine = llm.executor.engine
    result = llm.generate_async(PROMPT, SamplingParams(max_tokens=200, n=3, temperature=1.0, ignore_eos=True),
                                streaming=True)
    for step in result:
        if sum(len(o.token_ids) for o in step.outputs) >= 6:
            result.abort()
    result.result(timeout=10)
    assert result.outputs[0].finish_reason == "cancelled"
    deadline = time.monotonic() + 5
    while engine.kv_cache.num_free_blocks != engine.kv_cache.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks and not engine.requests


def test_n_greedy_sequences_are_identical(llm) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=5, n=2, temperature=0))
    alone = llm.generate(PROMPT, SamplingParams(max_tokens=5, temperature=0))
    assert [o.token_ids for o in out.outputs] == [alone.outputs[0].token_ids] * 2


def test_best_of_keeps_prompt_logprobs_whichever_sequence_wins(llm) -> None:
    params = SamplingParams(max_tokens=4, n=2, best_of=3, temperature=1.0, seed=1, prompt_logprobs=1)
    for prompt in (PROMPT, [3, 4, 5, 6]):
        out = llm.generate(prompt, params)
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
