"""GPU-only checks of the fast path: CUDA graphs and overlap change nothing in the
greedy output, and bf16 logits stay close to transformers'."""

from __future__ import annotations

import pytest
import torch

from rtllm import LLM, CudaGraphConfig, KvCacheConfig, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = [[5, 6, 7], list(range(20, 45)), [9], list(range(100, 140))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
    )
    config.architectures = ["LlamaForCausalLM"]
    path = tmp_path_factory.mktemp("gpu_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _greedy(model_dir: str, dtype: str, **kwargs) -> list[list[int]]:
    with LLM(
        model_dir,
        dtype=dtype,
        skip_tokenizer_init=True,
        kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=8192),
        max_batch_size=8,
        **kwargs,
    ) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=48, ignore_eos=True), use_tqdm=False)
        if kwargs.get("cuda_graph_config", CudaGraphConfig()) is not None:
            assert llm.executor.engine.runner.graphs is not None, "CUDA graphs were not captured"
        return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_and_overlap_do_not_change_tokens(model_dir, dtype):
    eager_sync = _greedy(model_dir, dtype, cuda_graph_config=None, disable_overlap_scheduler=True)
    graphs_sync = _greedy(model_dir, dtype, disable_overlap_scheduler=True)
    graphs_overlap = _greedy(model_dir, dtype, disable_overlap_scheduler=False)
    assert graphs_sync == eager_sync
    assert graphs_overlap == eager_sync
    # Padded replays: batch 3 runs in the graph captured for 4.
    padded = _greedy(model_dir, dtype, cuda_graph_config=CudaGraphConfig(batch_sizes=(4,)))
    assert padded == eager_sync


def test_bf16_logits_close_to_transformers(model_dir):
    from transformers import AutoModelForCausalLM

    from rtllm.engine.llm_request import LlmRequest, SamplingConfig
    from rtllm.engine.scheduler import ScheduledRequest
    from rtllm.llmapi.build import build_engine
    from rtllm.llmapi.llm_args import LlmArgs

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    built = build_engine(
        LlmArgs(model=model_dir, dtype="bfloat16", skip_tokenizer_init=True,
                kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096))
    )
    engine = built.engine
    for i, prompt in enumerate(PROMPTS):
        request = LlmRequest(i, prompt, SamplingConfig(max_tokens=1), 512)
        engine.kv_cache.allocate(request, len(prompt))
        got = engine.runner.execute([ScheduledRequest(request, len(prompt))], engine.kv_cache.block_table)
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0, -1]
            reference_bf16 = hf_bf16(torch.tensor([prompt], device="cuda")).logits[0, -1].float().cpu()
        got = got[0].float().cpu()
        # "Within tolerance" = no further from the float32 truth than transformers'
        # own bf16 run is (bf16 rounding compounds through these large random weights).
        hf_error = (reference_bf16 - want).abs().max().item()
        rtllm_error = (got - want).abs().max().item()
        assert rtllm_error <= 2 * hf_error + 1e-2 * want.abs().max().item(), (rtllm_error, hf_error)
        engine.kv_cache.free(i)
