"""Tensor/pipeline parallelism on GPUs (NCCL, one worker per GPU): greedy ids identical
to one GPU in float32, with CUDA graphs (holding the all-reduces) under TP."""

from __future__ import annotations

import os

import pytest
import torch

from rtllm import LLM, CudaGraphConfig, KvCacheConfig, SamplingParams
from rtllm.quantization import QuantAlgo, QuantConfig

from .test_parallel_llm import LATE_PROMPTS, PROMPTS, _batch_and_late_arrivals, _params, _save_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


@pytest.fixture(scope="module", autouse=True)
def _no_nvls():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return _save_llama(tmp_path_factory.mktemp("gpu_tp"), num_key_value_heads=2, hidden_size=64)


def _gpu_llm(path: str, tp: int = 1, pp: int = 1, graphs: bool = True, **kwargs) -> LLM:
    return LLM(
        path, skip_tokenizer_init=True, dtype="float32", device="cuda", tensor_parallel_size=tp,
        pipeline_parallel_size=pp, kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
        cuda_graph_config=CudaGraphConfig(max_batch_size=8) if graphs else None, **kwargs,
    )


@pytest.fixture(scope="module")
def expected(model) -> list[list[int]]:
    with _gpu_llm(model) as llm:
        outs = llm.generate(PROMPTS + LATE_PROMPTS, _params(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_tp2_with_cuda_graphs_matches_one_gpu(model, expected):
    with _gpu_llm(model, tp=2) as llm:
        assert _batch_and_late_arrivals(llm) == expected


def test_pp2_matches_one_gpu(model, expected):
    with _gpu_llm(model, pp=2, graphs=False) as llm:
        assert _batch_and_late_arrivals(llm) == expected


def test_tp2_quantized_runs_the_gpu_kernels(model):
    quant = QuantConfig(quant_algo=QuantAlgo.W8A16, kv_cache_quant_algo=QuantAlgo.FP8)
    params = SamplingParams(max_tokens=1, return_generation_logits=True)
    logits = {}
    for tp in (1, 2):
        with _gpu_llm(model, tp=tp, quant_config=quant) as llm:
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
        logits[tp] = torch.cat([o.outputs[0].generation_logits for o in outs])
    assert logits[2].argmax(-1).tolist() == logits[1].argmax(-1).tolist()
    # FP8 KV rounding amplifies the per-rank scale differences a little.
    torch.testing.assert_close(logits[2], logits[1], atol=0.05 * float(logits[1].abs().max()), rtol=0)
