"""Tensor/pipeline parallelism on CPU (gloo, one worker process per rank) through
``LLM(..., tensor_parallel_size=..., pipeline_parallel_size=...)``: greedy token ids
identical to a single process, and a killed worker fails requests instead of hanging."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.executor.result import RequestError
from rtllm.quantization import QuantAlgo, QuantConfig

PROMPTS = [[5, 6, 7], list(range(20, 45)), [9], list(range(100, 112))]
LATE_PROMPTS = [[17, 3, 250, 8], list(range(60, 70))]


def _save_llama(
    path, num_key_value_heads: int, hidden_size: int = 32, bias: bool = False, initializer_range: float = 0.2
) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=255,  # not divisible by tp: the last rank's vocabulary shard is padded
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=256,
        initializer_range=initializer_range, attention_bias=bias, mlp_bias=bias,
    )
    model = LlamaForCausalLM(config)
    if bias:  # Hugging Face initializes biases to zero: make them count
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory) -> str:
    return _save_llama(tmp_path_factory.mktemp("tp_gqa"), num_key_value_heads=2)  # 1 KV head per rank at tp=2


@pytest.fixture(scope="module")
def mqa_model(tmp_path_factory) -> str:
    return _save_llama(tmp_path_factory.mktemp("tp_mqa"), num_key_value_heads=1)  # replicated at tp=2


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    # Row-parallel ranks get 32 input columns: one int4 group of 32.
    return _save_llama(tmp_path_factory.mktemp("tp_wide"), num_key_value_heads=2, hidden_size=64)


def _llm(path: str, tp: int = 1, pp: int = 1, quant_config: QuantConfig | None = None) -> LLM:
    return LLM(
        path, skip_tokenizer_init=True, tensor_parallel_size=tp, pipeline_parallel_size=pp,
        kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=1024), quant_config=quant_config,
    )


def _params(n: int = 14) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _reference(path: str, quant_config: QuantConfig | None = None) -> list[list[int]]:
    with _llm(path, quant_config=quant_config) as llm:
        outs = llm.generate(PROMPTS + LATE_PROMPTS, _params(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _batch_and_late_arrivals(llm: LLM) -> list[list[int]]:
    """All of PROMPTS at once, then LATE_PROMPTS while the first ones are generating."""
    first = [llm.generate_async(p, _params(), streaming=True) for p in PROMPTS]
    seen = 0
    for out in first[1]:  # wait until the batch is mid-generation
        seen += len(out.outputs[0].token_ids_diff)
        if seen >= 3:
            break
    assert not first[1].finished
    late = [llm.generate_async(p, _params()) for p in LATE_PROMPTS]
    return [r.result(timeout=60).outputs[0].token_ids for r in first + late]


def test_tp2_matches_tp1(gqa_model):
    expected = _reference(gqa_model)
    with _llm(gqa_model, tp=2) as llm:
        assert len(llm.executor.worker_pids) == 2
        assert _batch_and_late_arrivals(llm) == expected
        with pytest.raises(ValueError, match="prompt token ids"):
            llm.generate_async([300], _params())  # rank 0's validation reaches the caller
        # The executor still works after a rejected request.
        assert llm.generate(PROMPTS[0], _params()).outputs[0].token_ids == expected[0]


def test_pp2_matches_tp1(gqa_model):
    expected = _reference(gqa_model)
    with _llm(gqa_model, pp=2) as llm:
        assert _batch_and_late_arrivals(llm) == expected


def test_tp2_pp2_with_replicated_kv_heads_matches_tp1(mqa_model):
    expected = _reference(mqa_model)
    with _llm(mqa_model, tp=2, pp=2) as llm:
        outs = llm.generate(PROMPTS + LATE_PROMPTS, _params(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.fixture(scope="module")
def biased_wide_model(tmp_path_factory) -> str:
    # Biases on q/k/v/o and gate/up/down: o_proj and down_proj are row-parallel.
    return _save_llama(tmp_path_factory.mktemp("tp_biased"), num_key_value_heads=2, hidden_size=64, bias=True)


def _quantized_first_logits(path: str, tp: int, quant: QuantConfig) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, return_generation_logits=True)
    with _llm(path, tp=tp, quant_config=quant) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return torch.cat([o.outputs[0].generation_logits for o in outs])


def test_tp2_quantized_on_load_matches_tp1(wide_model):
    # Each rank quantizes its own shard: column-parallel codes and scales are slices of
    # tp=1's, a row-parallel rank's per-channel scales span only its input columns, so
    # the logits agree within int8 rounding (a wrong slice would be far off).
    quant = QuantConfig(quant_algo=QuantAlgo.W8A16, kv_cache_quant_algo=QuantAlgo.INT8)
    expected, got = _quantized_first_logits(wide_model, 1, quant), _quantized_first_logits(wide_model, 2, quant)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(got, expected, atol=0.02 * float(expected.abs().max()), rtol=0)


def test_tp2_quantized_row_parallel_biases_are_added_once(biased_wide_model):
    # A row-parallel bias added by each rank's kernel would count twice after the
    # all-reduce: the biases here move the logits by far more than int8 rounding.
    quant = QuantConfig(quant_algo=QuantAlgo.W8A16)
    expected = _quantized_first_logits(biased_wide_model, 1, quant)
    got = _quantized_first_logits(biased_wide_model, 2, quant)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(got, expected, atol=0.02 * float(expected.abs().max()), rtol=0)


def test_calibrating_quantization_under_pp_is_refused(gqa_model):
    quant = QuantConfig(quant_algo=QuantAlgo.W8A8_SQ_PER_CHANNEL)
    with pytest.raises(NotImplementedError, match="W8A8_SQ_PER_CHANNEL.*pipeline parallelism"):
        _llm(gqa_model, pp=2, quant_config=quant)


@pytest.fixture(scope="module")
def calib_model(tmp_path_factory, byte_tokenizer) -> str:
    # Row-parallel ranks get 128 input columns: whole int4 groups of 128. Smaller
    # weights than the other models: int4 at 0.2 moves the logits as much as they vary.
    path = _save_llama(
        tmp_path_factory.mktemp("tp_calib"), num_key_value_heads=2, hidden_size=256, initializer_range=0.05
    )
    byte_tokenizer.save_pretrained(path)  # calibration tokenizes text
    return path


@pytest.fixture(scope="module")
def calib_reference(calib_model) -> torch.Tensor:
    return _quantized_first_logits(calib_model, 1, None)


# (W4A16_AWQ is AWQ's search then GPTQ rounding, FP8 GPTQ rounding on the FP8 grid.)
@pytest.mark.parametrize("algo", ["W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "FP8"])
def test_tp2_calibration_keeps_tp1_accuracy(calib_model, calib_reference, algo):
    # Every rank calibrates its own shard on the same samples, in step (the calibration
    # forward runs the model's all-reduces), with its own heads and MLP slice. Scales
    # folded into the norms are tp=1's: SmoothQuant takes the weight maxima over both
    # ranks' rows, AWQ's search adds its errors over the ranks. What differs from tp=1
    # is local to a row-parallel rank: its per-channel weight scales and, under
    # SmoothQuant, per-token activation scales span its own input columns, and GPTQ sees
    # its block of the Hessian. Two roundings of equal quality differ from each other
    # about as much as from the float model, so the check is the error to the float
    # model: tp=2's must be tp=1's (measured: within 6 %).
    group = {"group_size": 128} if algo.startswith("W4A16") else {}  # FP8: GPTQ-rounded weights
    quant = QuantConfig(quant_algo=algo, calib_size=4, calib_max_seq_length=64, **group)
    tp1_error = float((_quantized_first_logits(calib_model, 1, quant) - calib_reference).abs().mean())
    tp2_error = float((_quantized_first_logits(calib_model, 2, quant) - calib_reference).abs().mean())
    assert 0 < tp2_error < 1.25 * tp1_error


def test_killed_worker_fails_requests_naming_its_rank(gqa_model):
    with _llm(gqa_model, tp=2) as llm:
        long_params = SamplingParams(max_tokens=200, ignore_eos=True)
        results = [llm.generate_async(p, long_params, streaming=True) for p in PROMPTS[:2]]
        seen = 0
        for out in results[0]:
            seen += len(out.outputs[0].token_ids_diff)
            if seen >= 3:
                break
        os.kill(llm.executor.worker_pids[1], signal.SIGKILL)
        start = time.monotonic()
        for result in results:
            with pytest.raises(RequestError, match="rank 1"):
                result.result(timeout=30)
        assert time.monotonic() - start < 30
        with pytest.raises(RuntimeError, match="rank 1"):
            llm.generate_async(PROMPTS[0], _params())
