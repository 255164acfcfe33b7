"""End to end on a tiny random Llama: block reuse, chunked context, MAX_UTILIZATION
pausing and the host tier never change greedy output; reuse skips computation;
the LLM reports KV events and iteration stats."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtllm import LLM, KvCacheConfig, SamplingParams, SchedulerConfig
from rtllm.engine.capacity_scheduler import CapacitySchedulerPolicy

BLOCK = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("prefix_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def make_llm(model_dir: str, *, reuse: bool = True, max_tokens: int = 4096, host: int | None = None,
             policy: str = "GUARANTEED_NO_EVICT", **kwargs) -> LLM:
    return LLM(
        model_dir,
        skip_tokenizer_init=True,
        kv_cache_config=KvCacheConfig(
            tokens_per_block=BLOCK, max_tokens=max_tokens, enable_block_reuse=reuse, host_cache_size=host,
            event_buffer_max_size=kwargs.pop("events", 0),
        ),
        scheduler_config=SchedulerConfig(capacity_scheduler_policy=policy),
        **kwargs,
    )


def workload(seed: int) -> list[list[list[int]]]:
    """Waves of prompts: shared system prompts, multi-turn extensions and unshared ones."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 256) for _ in range(rng.randrange(9, 40))] for _ in range(3)]
    waves = []
    previous: list[list[int]] = []
    for _ in range(3):
        wave = []
        for _ in range(5):
            kind = rng.random()
            if kind < 0.5:
                prompt = rng.choice(systems) + [rng.randrange(1, 256) for _ in range(rng.randrange(1, 12))]
            elif kind < 0.8 and previous:
                prompt = rng.choice(previous) + [rng.randrange(1, 256) for _ in range(rng.randrange(1, 9))]
            else:
                prompt = [rng.randrange(1, 256) for _ in range(rng.randrange(1, 30))]
            wave.append(prompt)
        waves.append(wave)
        previous = wave
    return waves


def run_waves(llm: LLM, waves: list[list[list[int]]], max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    outputs = []
    for wave in waves:
        outputs += [o.outputs[0].token_ids for o in llm.generate(wave, params, use_tqdm=False)]
    engine = llm.executor.engine
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks  # nothing left holding blocks
    return outputs


@pytest.fixture(scope="module")
def reference(model_dir: str) -> dict[int, list[list[int]]]:
    with make_llm(model_dir, reuse=False) as llm:
        return {seed: run_waves(llm, workload(seed)) for seed in (1, 2)}


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"enable_chunked_prefill": True, "max_num_tokens": BLOCK},  # chunks of one block
        {"enable_chunked_prefill": True, "max_num_tokens": 13},
        {"disable_overlap_scheduler": False},
    ],
    ids=["reuse", "chunk-one-block", "chunk-13", "reuse-overlap"],
)
def test_reuse_and_chunking_keep_greedy_output(model_dir, reference, seed, variant) -> None:
    with make_llm(model_dir, **variant) as llm:
        assert run_waves(llm, workload(seed)) == reference[seed]
        assert llm.executor.engine.kv_cache.counters.reused_blocks > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_max_utilization_pauses_and_resumes_without_changing_output(model_dir, reference, overlap) -> None:
    # 10 blocks of 8 tokens: far fewer than 5 concurrent requests need to completion.
    with make_llm(model_dir, max_tokens=10 * BLOCK, policy="MAX_UTILIZATION", max_num_tokens=64, max_seq_len=10 * BLOCK,
                  disable_overlap_scheduler=not overlap) as llm:
        assert run_waves(llm, workload(1)) == reference[1]
        assert llm.executor.engine.scheduler.num_paused_total > 0


def test_static_batch_keeps_output(model_dir, reference) -> None:
    with make_llm(model_dir, policy=CapacitySchedulerPolicy.STATIC_BATCH, max_batch_size=3) as llm:
        assert run_waves(llm, workload(2)) == reference[2]


def test_host_tier_serves_evicted_prefixes(model_dir, reference) -> None:
    per_block = 2 * 2 * 2 * 8 * BLOCK * 4  # layers * (k, v) * kv heads * head_dim * tokens * fp32
    with make_llm(model_dir, max_tokens=12 * BLOCK, host=64 * per_block, dtype="float32", max_seq_len=12 * BLOCK) as llm:
        assert run_waves(llm, workload(1)) == reference[1]
        counters = llm.executor.engine.kv_cache.counters
        assert counters.offloaded_blocks > 0 and counters.onloaded_blocks > 0


def test_shared_prefix_computes_only_new_tokens(model_dir) -> None:
    with make_llm(model_dir) as llm:
        runner = llm.executor.engine.runner
        computed: list[int] = []
        original = runner.execute

        def counting_execute(scheduled, *args, **kwargs):
            computed.append(sum(item.num_new_tokens for item in scheduled))
            return original(scheduled, *args, **kwargs)

        runner.execute = counting_execute
        prefix = list(range(1, 201))  # 25 full blocks
        params = SamplingParams(max_tokens=1)
        llm.generate(prefix + [7, 8, 9], params)
        assert sum(computed) == 203
        computed.clear()
        second = llm.generate(prefix + [250, 251, 252, 253, 254], params)
        assert sum(computed) == 5  # the 200 shared tokens were not run again
        assert len(second.outputs[0].token_ids) == 1


def test_kv_cache_events_through_the_llm(model_dir) -> None:
    with make_llm(model_dir, events=1000) as llm:
        prompt = list(range(1, 2 * BLOCK + 4))  # two full blocks
        llm.generate(prompt, SamplingParams(max_tokens=1))
        events = llm.get_kv_cache_events(timeout=1)
        assert events[0]["data"]["type"] == "created"
        stored = [e["data"] for e in events if e["data"]["type"] == "stored"]
        blocks = [b for e in stored for b in e["blocks"]]
        assert [b["token_ids"] for b in blocks] == [prompt[:BLOCK], prompt[BLOCK : 2 * BLOCK]]
        assert stored[0]["parent_hash"] is None
        ids = [e["event_id"] for e in events]
        assert ids == sorted(ids)
        assert llm.get_kv_cache_events(timeout=0.05) == []


def test_iteration_stats_through_the_llm(model_dir) -> None:
    with make_llm(model_dir, enable_iter_perf_stats=True) as llm:
        prompt = list(range(1, 3 * BLOCK + 2))
        llm.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
        llm.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
        stats = llm.get_stats(timeout=1)
        assert [s["iter"] for s in stats] == list(range(1, len(stats) + 1))
        first = stats[0]
        assert first["inflightBatchingStats"]["numContextRequests"] == 1
        assert first["inflightBatchingStats"]["numCtxTokens"] == len(prompt)
        assert first["kvCacheStats"]["maxNumBlocks"] == 4096 // BLOCK
        assert first["iterLatencyMS"] > 0
        finished = [r for s in stats for r in s["requestStats"] if r["stage"] == "GENERATION_COMPLETE"]
        assert len(finished) == 2 and all(r["numGeneratedTokens"] == 3 for r in finished)
        assert all(r["timeToFirstTokenMs"] is not None and r["timeToFirstTokenMs"] > 0 for r in finished)
        assert [r["numReusedTokens"] for r in finished] == [0, 3 * BLOCK]
        assert stats[-1]["kvCacheStats"]["reusedBlocks"] == 3
    with make_llm(model_dir) as llm, pytest.raises(RuntimeError, match="enable_iter_perf_stats"):
        llm.get_stats()


def test_priority_and_salt_arguments_are_validated(model_dir) -> None:
    with make_llm(model_dir) as llm:
        with pytest.raises(ValueError, match="priority"):
            llm.generate_async([1, 2, 3], priority=float("nan"))
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate_async([1, 2, 3], cache_salt="")
        with pytest.raises(ValueError, match="priority has 1 entries for 2 prompts"):
            llm.generate([[1, 2], [3, 4]], priority=[1.0])
        out = llm.generate([[1, 2], [3, 4]], SamplingParams(max_tokens=2), priority=[1.0, 2.0], cache_salt="t")
        assert all(len(o.outputs[0].token_ids) == 2 for o in out)
