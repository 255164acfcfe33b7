"""Pre-quantized Hugging Face checkpoints (AWQ, GPTQ, FP8) load without flags.

Each test takes the tiny random Llama of conftest, quantizes its seven linear weights
per layer (q/k/v/o/gate/up/down) with rtllm's RTN quantizers and writes them in the
published layout next to the float norms and embeddings:

* AWQ (AutoAWQ ``version="gemm"``): ``<m>.qweight`` int32 ``[in, out/8]``,
  ``<m>.qzeros`` int32 ``[in/g, out/8]`` (4-bit fields in order 0,2,4,6,1,3,5,7),
  ``<m>.scales`` fp16 ``[in/g, out]``; ``quantization_config`` ``{"quant_method":
  "awq", "version": "gemm", "bits": 4, "group_size": g, "zero_point": true}``.
* GPTQ (AutoGPTQ v1, ``desc_act=false``): ``<m>.qweight`` int32 ``[in*bits/32, out]``
  packed along the input dim, ``<m>.qzeros`` int32 ``[in/g, out*bits/32]`` storing
  ``zero - 1``, ``<m>.scales`` fp16 ``[in/g, out]``, ``<m>.g_idx`` int32 ``[in]``.
* FP8 (HF ``quant_method="fp8"``): ``<m>.weight`` float8_e4m3fn ``[out, in]``,
  ``<m>.weight_scale`` float32 ``[]`` and ``<m>.input_scale`` float32 ``[]`` (static).

The reference is transformers' float model holding the *dequantized* weights: weight-
only formats must match its logits to float rounding and give its greedy tokens; FP8
also quantizes activations, so it is held to a looser bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.models.loader import build_model, load_model_config
from rtllm.quantization import QuantConfig
from rtllm.quantization.calibration import dense_forward
from rtllm.quantization.packing import pack_awq, pack_gptq
from rtllm.quantization.rtn import (
    dequantize,
    quantize_fp8_per_tensor,
    quantize_groupwise_asymmetric,
    quantize_groupwise_symmetric,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(5))


def _awq(w: torch.Tensor, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    q, scale, zero = quantize_groupwise_asymmetric(w, group, 4)
    t = pack_awq(q, zero, scale)
    deq = dequantize(q, t.scales.float().t(), zero)  # fp16 scales as stored
    return {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales}, deq


def _gptq(w: torch.Tensor, group: int, bits: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    signed, scale = quantize_groupwise_symmetric(w, group, bits)
    offset = 1 << (bits - 1)
    q = (signed.to(torch.int16) + offset).to(torch.uint8)
    zero = torch.full_like(scale, offset, dtype=torch.int32)
    t = pack_gptq(q, zero, scale, bits)
    deq = dequantize(q, t.scales.float().t(), zero)
    return {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales, "g_idx": t.g_idx}, deq


def _fp8(w: torch.Tensor, x_amax: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    q, scale = quantize_fp8_per_tensor(w)
    tensors = {"weight": q, "weight_scale": scale, "input_scale": torch.tensor(x_amax / 448.0)}
    return tensors, dequantize(q, scale)


FORMATS: dict[str, tuple[dict[str, Any], Any]] = {
    "awq_g64": (
        {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64, "zero_point": True},
        lambda w: _awq(w, 64),
    ),
    "gptq_4bit_g32": (
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True},
        lambda w: _gptq(w, 32, 4),
    ),
    "gptq_8bit_per_channel": (
        {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "sym": True},
        lambda w: _gptq(w, -1, 8),
    ),
    "fp8_static": (
        {"quant_method": "fp8", "activation_scheme": "static"},
        lambda w: _fp8(w, 40.0),
    ),
}


def write_quantized(src: str, hf_model: Any, dst: Path, fmt: str) -> Any:
    """Write ``fmt`` of ``hf_model`` to ``dst``; return transformers' float model with
    the dequantized weights (the reference)."""
    from transformers import AutoModelForCausalLM

    hf_config, quantize = FORMATS[fmt]
    tensors, dequantized = {}, {}
    for name, p in hf_model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module.rsplit(".", 1)[-1] in LINEARS and leaf == "weight":
            packed, deq = quantize(p.detach().float())
            tensors.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
            dequantized[name] = deq
        else:
            tensors[name] = p.detach().contiguous()
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((Path(src) / "config.json").read_text())
    config["quantization_config"] = hf_config
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(src) / name).exists():
            (dst / name).write_bytes((Path(src) / name).read_bytes())
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    reference.load_state_dict({**reference.state_dict(), **dequantized})
    return reference


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, tiny_llama_factory: Any) -> tuple[str, Any]:
    path = tmp_path_factory.mktemp("float_src")
    return str(path), tiny_llama_factory(path, seed=11, outliers=False)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prequantized_checkpoint_matches_dequantized_float(source, tmp_path, fmt):
    reference = write_quantized(source[0], source[1], tmp_path / fmt, fmt)
    path = str(tmp_path / fmt)
    config = load_model_config(path)
    model = build_model(path, config, torch.float32, torch.device("cpu"))  # no quant flags
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant is not None and qkv.weight is None
    logits = dense_forward(model, IDS)
    with torch.no_grad():
        expected = reference(IDS[None]).logits[0]
    if fmt.startswith("fp8"):
        err = float((logits - expected).norm() / expected.norm())
        assert err < 0.1, err
        assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.85
        return
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    # Greedy tokens through the engine equal transformers' on the dequantized model.
    llm = LLM(model=path, dtype="float32", device="cpu", cuda_graph_config=None)
    try:
        prompt = IDS[:10].tolist()
        out = llm.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    finally:
        llm.shutdown()
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, 10:].tolist()


def test_act_order_gptq_is_not_supported(source, tmp_path):
    write_quantized(source[0], source[1], tmp_path / "g", "gptq_4bit_g32")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="desc_act"):
        LLM(model=str(tmp_path / "g"), device="cpu")


def test_conflicting_quant_config_is_rejected(source, tmp_path):
    write_quantized(source[0], source[1], tmp_path / "a", "awq_g64")
    with pytest.raises(ValueError, match="already quantized"):
        LLM(model=str(tmp_path / "a"), device="cpu", quant_config=QuantConfig(quant_algo="W8A16"))


@pytest.mark.parametrize("fmt", ["awq_g64", "gptq_4bit_g32", "gptq_8bit_per_channel", "fp8_static"])
def test_prequantized_checkpoint_under_tp2_matches_one_process(source, tmp_path, fmt):
    # Each rank reads only its slice of the packed tensors (words and groups split at
    # rank boundaries; per-channel and per-tensor scales replicated): the codes are
    # tp=1's, so greedy ids agree.
    write_quantized(source[0], source[1], tmp_path / fmt, fmt)
    prompts = [IDS[:10].tolist(), IDS[20:27].tolist()]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = {}
    for tp in (1, 2):
        with LLM(model=str(tmp_path / fmt), dtype="float32", device="cpu", tensor_parallel_size=tp,
                 skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(max_tokens=1024)) as llm:
            outs[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[2] == outs[1]
