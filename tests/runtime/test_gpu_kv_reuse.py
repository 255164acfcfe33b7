"""GPU: block reuse, the pinned host tier, chunked context and MAX_UTILIZATION pausing,
with the Triton backend, CUDA graphs and the overlap loop, keep greedy output (float32)."""

from __future__ import annotations

import random

import pytest
import torch

from rtllm import LLM, KvCacheConfig, SamplingParams, SchedulerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
    )
    config.architectures = ["LlamaForCausalLM"]
    path = tmp_path_factory.mktemp("gpu_reuse_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def waves() -> list[list[list[int]]]:
    rng = random.Random(0)
    system = [rng.randrange(1, 512) for _ in range(70)]
    first = [system + [rng.randrange(1, 512) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    second = [p + [rng.randrange(1, 512) for _ in range(5)] for p in first[:3]]
    second += [[rng.randrange(1, 512) for _ in range(40)] for _ in range(3)]
    return [first, second, [p + [7, 8] for p in second]]


def run(model_dir: str, reuse: bool, max_tokens: int = 8192, host: int | None = None, **kwargs) -> list[list[int]]:
    with LLM(
        model_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        max_batch_size=8,
        kv_cache_config=KvCacheConfig(
            tokens_per_block=BLOCK, max_tokens=max_tokens, enable_block_reuse=reuse, host_cache_size=host
        ),
        **kwargs,
    ) as llm:
        out = []
        for wave in waves():
            results = llm.generate(wave, SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
            out += [r.outputs[0].token_ids for r in results]
        engine = llm.executor.engine
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
        if reuse:
            assert engine.kv_cache.counters.reused_blocks > 0
        if host:
            assert engine.kv_cache.counters.onloaded_blocks > 0
        if kwargs.get("scheduler_config") is not None:
            assert engine.scheduler.num_paused_total > 0
        return out


def test_reuse_variants_match_no_reuse_on_gpu(model_dir):
    expected = run(model_dir, reuse=False)
    assert run(model_dir, reuse=True) == expected
    assert run(model_dir, reuse=True, enable_chunked_prefill=True, max_num_tokens=BLOCK) == expected
    per_block = 2 * 2 * 2 * 32 * BLOCK * 4
    assert run(model_dir, reuse=True, max_tokens=10 * BLOCK, host=64 * per_block, max_seq_len=10 * BLOCK) == expected
    policy = SchedulerConfig(capacity_scheduler_policy="MAX_UTILIZATION")
    assert run(model_dir, reuse=True, max_tokens=16 * BLOCK, scheduler_config=policy, max_seq_len=10 * BLOCK) == expected
