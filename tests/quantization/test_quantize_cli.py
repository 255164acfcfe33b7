"""``rtllm quantize`` writes checkpoints that ``LLM(model=DIR)`` loads with no flags."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rtllm.cli import main
from rtllm.layers.linear import Linear
from rtllm.models.loader import build_model, load_model_config
from rtllm.quantization import QuantConfig
from rtllm.quantization.calibration import dense_forward

IDS = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(7))
CALIB = ["--calib-size", "4", "--calib-max-seq-length", "256"]
# qformat -> (quant_method written, layer quant_algo after loading, bound on the
# relative logits error against the float model; see test_quantized_models for why
# this tiny outlier-heavy model needs loose int4 bounds).
EXPECTED = {
    "w4a16_awq": ("awq", "W4A16_AWQ", 0.5),
    "w4a16": ("gptq", "W4A16_GPTQ", 0.9),
    "w8a16": ("gptq", "W8A16_GPTQ", 0.15),
    "fp8": ("fp8", "FP8", 0.35),
    "w8a8_sq": ("rtllm", "W8A8_SQ_PER_CHANNEL", 0.12),
}


def _load(path: str):
    return build_model(path, load_model_config(path), torch.float32, torch.device("cpu"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def float_logits(tiny_llama):
    return dense_forward(_load(tiny_llama[0]), IDS)


@pytest.mark.parametrize("qformat", list(EXPECTED))
def test_quantize_then_load(tiny_llama, float_logits, tmp_path, qformat, capsys):
    out = str(tmp_path / qformat)
    assert main(["quantize", "--model", tiny_llama[0], "--qformat", qformat, "--output", out, *CALIB]) == 0
    assert "wrote" in capsys.readouterr().out
    method, algo, bound = EXPECTED[qformat]
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)["quantization_config"]
    assert written["quant_method"] == method
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    model = _load(out)
    decoder = [m for m in model.modules() if isinstance(m, Linear) and m.prefix.startswith("model.layers")]
    assert all(m.quant is not None and m.quant_config.quant_algo == algo for m in decoder)
    err = _rel(dense_forward(model, IDS), float_logits)
    assert 0 < err < bound, err


def test_awq_checkpoint_matches_quantizing_on_load(tiny_llama, tmp_path):
    """The exported AWQ checkpoint and AWQ applied at load (same calibration, group 64)
    give nearly the same model; they differ only by the fp16 rounding of the scales."""
    out = str(tmp_path / "awq")
    main(["quantize", "--model", tiny_llama[0], "--qformat", "w4a16_awq", "--group-size", "64",
          "--output", out, *CALIB])
    on_load = build_model(
        tiny_llama[0], load_model_config(tiny_llama[0]), torch.float32, torch.device("cpu"),
        quant_config=QuantConfig(quant_algo="W4A16_AWQ", group_size=64, has_zero_point=True,
                                 calib_size=4, calib_max_seq_length=256),
    )
    exported = dense_forward(_load(out), IDS)
    assert _rel(exported, dense_forward(on_load, IDS)) < 0.01


def test_kv_cache_dtype_is_recorded_and_loaded(tiny_llama, tmp_path):
    from rtllm import LLM

    out = str(tmp_path / "kv")
    main(["quantize", "--model", tiny_llama[0], "--qformat", "w8a16", "--kv-cache-dtype", "fp8",
          "--output", out])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["kv_cache_quant_algo"] == "FP8"
    with LLM(model=out, device="cpu") as llm:  # the KV cache is stored as FP8
        assert llm.executor.engine.runner.kv_cache_dtype == torch.float8_e4m3fn


def test_bad_arguments(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--model", tiny_llama[0], "--qformat", "int3", "--output", str(tmp_path)])
    assert main(["quantize", "--model", tiny_llama[0], "--qformat", "w8a16", "--group-size", "64",
                 "--output", str(tmp_path / "x")]) == 2
    assert "group_size applies to w4a16_awq only" in capsys.readouterr().err
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "f").write_text("x")
    assert main(["quantize", "--model", tiny_llama[0], "--qformat", "w8a16",
                 "--output", str(tmp_path / "full")]) == 2


def test_smoothquant_export_loads_under_tp2(tiny_llama, tmp_path):
    """rtllm's own layout (int8 codes, per-channel scales, smoothing vector) is sliced per
    rank; row-parallel ranks quantize their own activation columns per token, so the
    logits agree with one process to int8 rounding."""
    from rtllm import LLM, KvCacheConfig, SamplingParams

    out = str(tmp_path / "sq")
    assert main(["quantize", "--model", tiny_llama[0], "--qformat", "w8a8_sq", "--output", out, *CALIB]) == 0
    params = SamplingParams(max_tokens=1, return_generation_logits=True)
    prompts = [IDS[:12].tolist(), IDS[40:47].tolist()]
    logits = {}
    for tp in (1, 2):
        with LLM(model=out, dtype="float32", device="cpu", tensor_parallel_size=tp, skip_tokenizer_init=True,
                 kv_cache_config=KvCacheConfig(max_tokens=1024)) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
        logits[tp] = torch.cat([o.outputs[0].generation_logits for o in outs])
    assert logits[2].argmax(-1).tolist() == logits[1].argmax(-1).tolist()
    assert _rel(logits[2], logits[1]) < 0.05
