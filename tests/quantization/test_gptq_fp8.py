"""GPTQ on the FP8 E4M3 grid (rtllm.quantization.gptq_fp8) and its calibration wiring
(FP8 / FP8_PER_CHANNEL_PER_TOKEN with ``fp8_weight_rounding``), on tiny inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rtllm.layers.linear import Linear
from rtllm.models.loader import build_model, load_model_config
from rtllm.quantization import QuantConfig, calibration, smoothing
from rtllm.quantization.gptq import hessian, output_error
from rtllm.quantization.gptq_fp8 import gptq_quantize_fp8
from rtllm.quantization.rtn import (
    FP8_MAX,
    dequantize,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
)

CPU = torch.device("cpu")
SMALL_CALIB = {"calib_size": 4, "calib_max_seq_length": 128}
BLOCKS = [12, 4, 16]  # row blocks of the 32-row problem (like q / k / v shards)


def _keeper_problem(seed: int = 0, out: int = 32, inp: int = 64, n: int = 256):
    """A weight whose largest entries get pushed off their ±448 code by the feedback.

    Input channel 63 nearly copies channel 0 (quantized first in act order, the last
    one last), so it absorbs channel 0's large rounding errors (weights near 0.08, on
    the coarse end of the grid), and it holds every row's largest weight (±0.1); row 0
    is twice as large as the others, so its channel-63 entry is the only one setting
    the per-tensor amax. Without the keeper rule (an end code kept in every scale
    block) RTN's re-quantization of seed 0's result finds other scales (measured, fp32
    and bf16, either column order): the per-tensor one, the 12-row block's, 12-16 of
    the 32 rows' per channel.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.01
    x = torch.randn(n, inp, generator=gen)
    x[:, 0] *= 2.0
    x[:, -1] = 0.3 * x[:, 0] + 0.05 * torch.randn(n, generator=gen)
    w[:, 0] = 0.035 + 0.01 * torch.rand(out, generator=gen)
    w[:, -1] = 0.05 * torch.sign(torch.randn(out, generator=gen))
    w[0] *= 2.0
    return w, hessian(x.t() @ x, n)


def _rtn(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN codes and scales ``[out, 1]`` (``[]`` per tensor), per row block for "blocks"."""
    if mode == "tensor":
        return quantize_fp8_per_tensor(w)
    if mode == "channel":
        return quantize_fp8_per_channel(w)
    parts = [quantize_fp8_per_tensor(p) for p in w.split(BLOCKS)]
    scales = [s.expand(p.shape[0], 1) for (_, s), p in zip(parts, w.split(BLOCKS), strict=True)]
    return torch.cat([q for q, _ in parts]), torch.cat(scales)


def _gptq(w: torch.Tensor, h: torch.Tensor, mode: str, **kwargs):
    blocks = BLOCKS if mode == "blocks" else None
    return gptq_quantize_fp8(w, h, per_channel=mode == "channel", row_blocks=blocks, **kwargs)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("mode", ["tensor", "channel", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_to_nearest_gives_back_the_codes_and_scales(dtype, mode, act_order):
    w, h = _keeper_problem()
    w = w.to(dtype)
    result = _gptq(w, h, mode, act_order=act_order)
    rtn_q, rtn_scale = _rtn(w, mode)
    # The scales are RTN's of the input weight, the codes GPTQ's own.
    assert result.q.dtype == torch.float8_e4m3fn and result.q.shape == w.shape
    assert result.scale.dtype == torch.float32 and torch.equal(result.scale, rtn_scale)
    changed = (_bits(result.q) != _bits(rtn_q)).float().mean()
    assert changed > 0.1, changed
    # The returned float weight, in the weight's own dtype, re-quantizes to them exactly.
    q2, scale2 = _rtn(result.dequantized.to(dtype), mode)
    assert torch.equal(scale2, result.scale)
    assert torch.equal(_bits(q2), _bits(result.q))
    # It is q * scale, with every ±448 code at ±amax of its scale block exactly.
    torch.testing.assert_close(result.dequantized, dequantize(result.q, result.scale),
                               rtol=1e-6, atol=0)
    ends = result.q.float().abs() == FP8_MAX
    wa = w.float().abs()
    amax = {"tensor": wa.amax().expand(w.shape[0]), "channel": wa.amax(dim=1),
            "blocks": torch.cat([p.amax().expand(p.shape[0]) for p in wa.split(BLOCKS)])}[mode]
    expected = torch.sign(result.q.float()) * amax[:, None]
    assert torch.equal(result.dequantized[ends], expected[ends])
    if mode == "channel":
        assert ends.any(dim=1).all()


@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_gptq_fp8_beats_round_to_nearest_on_a_correlated_hessian(mode):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 192, generator=gen) * 0.05
    x = torch.randn(512, 24, generator=gen) @ torch.randn(24, 192, generator=gen)
    x = x + 0.3 * torch.randn(512, 192, generator=gen)
    x[:, :3] *= 5.0
    h = hessian(x.t() @ x, 512)
    result = _gptq(w, h, mode)
    rtn_q, rtn_scale = _rtn(w, mode)
    gptq_err = output_error(result.dequantized - w, h)
    rtn_err = output_error(dequantize(rtn_q, rtn_scale) - w, h)
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize("mode", ["tensor", "channel", "blocks"])
def test_diagonal_hessian_gives_round_to_nearest(mode):
    """Uncorrelated inputs: no feedback, GPTQ's FP8 codes are RTN's."""
    w, _ = _keeper_problem(seed=1)
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(2)) + 0.5)
    h[7, 7] = 0.0  # a channel calibration never saw: kept (RTN), not zeroed
    result = _gptq(w, h, mode)
    rtn_q, rtn_scale = _rtn(w, mode)
    assert torch.equal(_bits(result.q), _bits(rtn_q)) and torch.equal(result.scale, rtn_scale)


def test_bad_arguments():
    w, h = _keeper_problem()
    with pytest.raises(ValueError, match="row_blocks"):
        gptq_quantize_fp8(w, h, row_blocks=[16, 8])
    with pytest.raises(ValueError, match="exclude"):
        gptq_quantize_fp8(w, h, per_channel=True, row_blocks=[32])
    with pytest.raises(ValueError, match="disagree"):
        gptq_quantize_fp8(w, h[:8, :8])
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize_fp8(bad, h)


# --- calibration wiring on the tiny Llama (conftest) ---------------------------------


def _build(path: str, quant_config: QuantConfig):
    return build_model(path, load_model_config(path), torch.float32, CPU, "auto", 0, quant_config)


@pytest.fixture
def spy(monkeypatch):
    """Counts of calibration passes and GPTQ-FP8 roundings (per-channel flag, blocks)."""
    calls: dict[str, list] = {"samples": [], "fp8": []}
    samples, fp8 = calibration.calibration_samples, smoothing.gptq_quantize_fp8

    def counted_samples(*args, **kwargs):
        calls["samples"].append(1)
        return samples(*args, **kwargs)

    def counted_fp8(w, h, per_channel=False, row_blocks=None, **kwargs):
        calls["fp8"].append((per_channel, row_blocks))
        return fp8(w, h, per_channel, row_blocks, **kwargs)

    monkeypatch.setattr(smoothing, "calibration_samples", counted_samples)  # on load
    monkeypatch.setattr(calibration, "calibration_samples", counted_samples)  # rtllm quantize
    monkeypatch.setattr(smoothing, "gptq_quantize_fp8", counted_fp8)
    return calls


def _decoder(model) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.prefix.startswith("model.layers.")]


@pytest.mark.parametrize("algo", ["FP8", "FP8_PER_CHANNEL_PER_TOKEN"])
def test_fp8_on_load_calibrates_only_for_gptq_rounding(tiny_llama, spy, algo):
    nearest = _build(tiny_llama[0], QuantConfig(quant_algo=algo, fp8_weight_rounding="nearest"))
    assert spy == {"samples": [], "fp8": []}
    gptq = _build(tiny_llama[0], QuantConfig(quant_algo=algo, **SMALL_CALIB))
    assert len(spy["samples"]) == 1
    per_channel = algo == "FP8_PER_CHANNEL_PER_TOKEN"
    assert spy["fp8"] == [(per_channel, None)] * 8  # 2 layers x 4 linears, fused scales
    changed = 0
    for a, b in zip(_decoder(nearest), _decoder(gptq), strict=True):
        assert torch.equal(a.quant.weight_scale, b.quant.weight_scale)  # RTN's scales
        changed += int((_bits(a.quant.weight) != _bits(b.quant.weight)).sum())
    assert changed > 0.05 * sum(m.quant.weight.numel() for m in _decoder(gptq))


def test_static_fp8_gets_its_input_scale_from_either_calibration(tiny_llama, spy):
    scales = {}
    for rounding in ("nearest", "gptq"):
        config = QuantConfig(quant_algo="FP8", activation_scheme="static",
                             fp8_weight_rounding=rounding, **SMALL_CALIB)
        scales[rounding] = [float(m.quant.input_scale) for m in _decoder(_build(tiny_llama[0], config))]
    assert len(spy["samples"]) == 2 and len(spy["fp8"]) == 8  # GPTQ for "gptq" only
    # The first linear sees the same (float) inputs either way; all are calibrated.
    assert scales["gptq"][0] == scales["nearest"][0]
    assert all(s != 1.0 for s in scales["gptq"] + scales["nearest"])


def test_dummy_fp8_weights_are_not_calibrated(spy):
    from rtllm.models.config import ModelConfig

    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
    )
    build_model("unused", config, torch.float32, CPU, "dummy", 0, QuantConfig(quant_algo="FP8"))
    assert spy == {"samples": [], "fp8": []}


def test_quantize_cli_rounds_each_shard_on_its_own_scale(tiny_llama, tmp_path, spy):
    """``rtllm quantize --qformat fp8`` rounds with GPTQ on one scale per checkpoint
    module (as it writes them), records no rounding option, and loading the result
    calibrates nothing."""
    from safetensors.torch import load_file

    from rtllm.cli import main

    out = str(tmp_path / "fp8")
    args = ["--calib-size", "4", "--calib-max-seq-length", "128"]
    assert main(["quantize", "--model", tiny_llama[0], "--qformat", "fp8", "--output", out, *args]) == 0
    assert len(spy["samples"]) == 1
    # q / k / v and gate / up shards; o_proj and down_proj are one shard each.
    assert sorted(b for _, b in spy["fp8"]) == [[128]] * 4 + [[128, 64, 64]] * 2 + [[256, 256]] * 2
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"] == {"quant_method": "fp8", "activation_scheme": "dynamic"}
    tensors = load_file(os.path.join(out, "model.safetensors"))
    source = tiny_llama[1].state_dict()
    changed = 0
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        q, scale = quantize_fp8_per_tensor(source[f"{name}.weight"])
        assert torch.equal(tensors[f"{name}.weight_scale"], scale)  # the shard's RTN scale
        changed += int((_bits(tensors[f"{name}.weight"]) != _bits(q)).sum())
    assert changed > 0
    model = _build(out, None)
    assert len(spy["samples"]) == 1 and all(m.quant is not None for m in _decoder(model))


def test_quantize_cli_nearest_rounding(tiny_llama, tmp_path, spy):
    from safetensors.torch import load_file

    from rtllm.cli import main
    from rtllm.quantization.export import export_config

    out = str(tmp_path / "fp8")
    main(["quantize", "--model", tiny_llama[0], "--qformat", "fp8", "--fp8-weight-rounding",
          "nearest", "--output", out])
    assert spy == {"samples": [], "fp8": []}
    q, _ = quantize_fp8_per_tensor(tiny_llama[1].state_dict()["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(_bits(load_file(os.path.join(out, "model.safetensors"))[
        "model.layers.1.self_attn.v_proj.weight"]), _bits(q))
    with pytest.raises(ValueError, match="fp8 only"):
        export_config("w8a16", fp8_weight_rounding="nearest")
