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


@pytest.mark.parametrize("algo", ["W4A16_AWQ", "W8A8_SQ_PER_CHANNEL"])
def test_tp2_calibration_over_nccl_keeps_one_gpu_accuracy(tmp_path_factory, byte_tokenizer, algo):
    # As test_parallel_llm's gloo test: each rank calibrates its shard in step (NCCL
    # all-reduces in the calibration forward, the AWQ error sums and SmoothQuant maxima).
    path = _save_llama(tmp_path_factory.mktemp("gpu_tp_calib"), 2, hidden_size=256, initializer_range=0.05)
    byte_tokenizer.save_pretrained(path)
    group = {"group_size": 128} if algo == "W4A16_AWQ" else {}
    quant = QuantConfig(quant_algo=algo, calib_size=4, calib_max_seq_length=64, **group)
    params = SamplingParams(max_tokens=1, return_generation_logits=True)

    def first_logits(tp: int, quant_config: QuantConfig | None) -> torch.Tensor:
        with _gpu_llm(path, tp=tp, quant_config=quant_config) as llm:
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
        return torch.cat([o.outputs[0].generation_logits for o in outs])

    reference = first_logits(1, None)
    tp1_error = float((first_logits(1, quant) - reference).abs().mean())
    tp2_error = float((first_logits(2, quant) - reference).abs().mean())
    assert 0 < tp2_error < 1.25 * tp1_error
