"""QuantConfig validation, QuantMode flags, module exclusion and Hugging Face round trips."""

from __future__ import annotations

import dataclasses

import pytest

from rtllm.quantization.config import QuantConfig, is_module_excluded
from rtllm.quantization.mode import QuantAlgo, QuantMode


def test_algo_values_are_tensorrt_llm_names() -> None:
    for algo in QuantAlgo:
        assert algo.value == algo.name
    assert QuantAlgo("W4A16_AWQ") is QuantAlgo.W4A16_AWQ


def test_defaults_and_string_coercion() -> None:
    cfg = QuantConfig()
    assert cfg.quant_algo is None and cfg.kv_cache_quant_algo is None
    assert cfg.group_size == 128 and cfg.quant_mode == QuantMode(0)
    cfg = QuantConfig(quant_algo="w4a16_awq", kv_cache_quant_algo="fp8")
    assert cfg.quant_algo is QuantAlgo.W4A16_AWQ
    assert cfg.kv_cache_quant_algo is QuantAlgo.FP8


def test_frozen_and_hashable() -> None:
    cfg = QuantConfig(quant_algo=QuantAlgo.W8A16, exclude_modules=["lm_head"])
    assert cfg.exclude_modules == ("lm_head",)
    assert hash(cfg) == hash(QuantConfig(quant_algo="W8A16", exclude_modules=("lm_head",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.group_size = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"quant_algo": "W4A16_AWQ", "group_size": 32}, ["group_size", "64", "128"]),
        ({"quant_algo": "W4A16_GPTQ", "group_size": 16}, ["group_size", "-1", "32"]),
        ({"quant_algo": "W8A16_GPTQ", "group_size": 256}, ["group_size"]),
        ({"quant_algo": "W8A16", "group_size": 0}, ["group_size"]),
        ({"quant_algo": "W8A16", "group_size": True}, ["group_size"]),
        ({"quant_algo": "INT8"}, ["quant_algo", "W8A16"]),
        ({"quant_algo": "W3A16"}, ["quant_algo"]),
        ({"kv_cache_quant_algo": "W8A16"}, ["kv_cache_quant_algo", "FP8", "INT8"]),
        ({"kv_cache_quant_algo": "NO_QUANT"}, ["kv_cache_quant_algo"]),
        ({"quant_algo": "W8A16", "has_zero_point": True}, ["has_zero_point", "W4A16_AWQ"]),
        ({"quant_algo": "W4A16", "has_zero_point": True}, ["has_zero_point"]),
        ({"quant_algo": "FP8", "pre_quant_scale": True}, ["pre_quant_scale", "W4A16_AWQ"]),
        ({"quant_algo": "W8A16", "activation_scheme": "static"}, ["activation_scheme", "FP8"]),
        ({"quant_algo": "FP8", "activation_scheme": "tensor"}, ["activation_scheme", "static"]),
        ({"exclude_modules": "lm_head"}, ["exclude_modules"]),
        ({"exclude_modules": ["lm_head", 3]}, ["exclude_modules"]),
        ({"smoothquant_val": 1.5}, ["smoothquant_val"]),
        ({"calib_size": 0}, ["calib_size"]),
        ({"calib_max_seq_length": -1}, ["calib_max_seq_length"]),
        ({"quant_algo": "FP8", "fp8_weight_rounding": "rtn"}, ["fp8_weight_rounding", "gptq", "nearest"]),
        ({"quant_algo": "FP8", "fp8_weight_rounding": None}, ["fp8_weight_rounding", "gptq", "nearest"]),
        ({"quant_algo": "W8A16", "fp8_weight_rounding": "nearest"},
         ["fp8_weight_rounding", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16"]),
        ({"fp8_weight_rounding": "nearest"}, ["fp8_weight_rounding", "FP8"]),
    ],
)
def test_invalid_combinations_name_the_field(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        QuantConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {
            "quant_algo": "W4A16_AWQ",
            "group_size": 64,
            "has_zero_point": True,
            "pre_quant_scale": True,
        },
        {"quant_algo": "W4A16_GPTQ", "group_size": -1},
        {"quant_algo": "W8A16_GPTQ", "group_size": 32, "has_zero_point": True},
        {"quant_algo": "W8A8_SQ_PER_CHANNEL", "pre_quant_scale": True, "smoothquant_val": 0.8},
        {"quant_algo": "FP8", "activation_scheme": "static", "kv_cache_quant_algo": "FP8"},
        {"quant_algo": "NO_QUANT", "kv_cache_quant_algo": "INT8"},
        {"quant_algo": "W4A16", "group_size": 100},  # ignored by per-channel algos
        {"quant_algo": "FP8", "fp8_weight_rounding": "nearest", "activation_scheme": "static"},
        {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "fp8_weight_rounding": "nearest"},
        {"quant_algo": "W4A16_GPTQ", "fp8_weight_rounding": "gptq"},  # the default: allowed
    ],
)
def test_valid_combinations(kwargs: dict) -> None:
    QuantConfig(**kwargs)


def test_group_size_checked_against_layer() -> None:
    awq = QuantConfig(quant_algo="W4A16_AWQ")
    awq.check_in_features(256)
    with pytest.raises(ValueError, match="group_size 128 .* in_features 200"):
        awq.check_in_features(200, "model.layers.0.mlp.down_proj")
    assert awq.weight_group_size == 128
    per_channel = QuantConfig(quant_algo="W4A16")
    assert per_channel.weight_group_size == -1
    per_channel.check_in_features(200)
    assert QuantConfig(quant_algo="W4A16_GPTQ", group_size=-1).weight_group_size == -1


M = QuantMode


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, M(0)),
        ({"quant_algo": "NO_QUANT"}, M(0)),
        ({"quant_algo": "W8A16"}, M.INT8_WEIGHTS | M.PER_CHANNEL),
        ({"quant_algo": "W4A16"}, M.INT4_WEIGHTS | M.PER_CHANNEL),
        ({"quant_algo": "W4A16_AWQ"}, M.INT4_WEIGHTS | M.PER_GROUP),
        ({"quant_algo": "W4A16_GPTQ", "group_size": -1}, M.INT4_WEIGHTS | M.PER_CHANNEL),
        ({"quant_algo": "W8A16_GPTQ"}, M.INT8_WEIGHTS | M.PER_GROUP),
        (
            {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
            M.INT8_WEIGHTS | M.ACTIVATIONS | M.PER_CHANNEL | M.PER_TOKEN,
        ),
        ({"quant_algo": "FP8"}, M.FP8_QDQ | M.PER_TOKEN),
        ({"quant_algo": "FP8", "activation_scheme": "static"}, M.FP8_QDQ),
        ({"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}, M.FP8_ROWWISE | M.PER_CHANNEL | M.PER_TOKEN),
        ({"kv_cache_quant_algo": "INT8"}, M.INT8_KV_CACHE),
        (
            {"quant_algo": "W8A16", "kv_cache_quant_algo": "FP8"},
            M.INT8_WEIGHTS | M.PER_CHANNEL | M.FP8_KV_CACHE,
        ),
    ],
)
def test_quant_mode_flags(kwargs: dict, expected: QuantMode) -> None:
    assert QuantMode.from_quant_config(QuantConfig(**kwargs)) == expected


def test_quant_mode_helpers() -> None:
    assert QuantMode.from_quant_config(None) == QuantMode(0)
    w4 = QuantConfig(quant_algo="W4A16_AWQ").quant_mode
    assert w4.is_weight_only() and w4.is_int4_weight_only() and not w4.is_int8_weight_only()
    assert w4.has_per_group_scaling() and w4.has_weight_quant() and not w4.has_kv_cache_quant()
    sq = QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL").quant_mode
    assert sq.has_act_and_weight_quant() and not sq.is_weight_only()
    assert sq.has_per_channel_scaling() and sq.has_per_token_dynamic_scaling()
    fp8 = QuantConfig(quant_algo="FP8", kv_cache_quant_algo="FP8").quant_mode
    assert fp8.has_fp8_qdq() and not fp8.has_fp8_rowwise() and not fp8.is_weight_only()
    assert fp8.has_fp8_kv_cache() and not fp8.has_int8_kv_cache() and fp8.has_kv_cache_quant()
    assert QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN").quant_mode.has_fp8_rowwise()
    kv_only = QuantConfig(kv_cache_quant_algo="INT8").quant_mode
    assert kv_only.has_int8_kv_cache() and not kv_only.has_weight_quant()


@pytest.mark.parametrize(
    ("name", "patterns", "excluded"),
    [
        ("lm_head", ["lm_head"], True),
        ("model.layers.0.mlp.down_proj", ["*.mlp.*"], True),
        ("model.layers.0.self_attn.o_proj", ["*.mlp.*"], False),
        ("model.layers.3.mlp.down_proj", ["mlp.down_proj"], True),
        ("model.layers.3.mlp.up_proj", ["mlp.down_proj"], False),
        ("model.layers.1.self_attn.o_proj", ["model.layers.1"], True),
        ("model.layers.10.self_attn.o_proj", ["model.layers.1"], False),
        ("model.layers.7.self_attn.q_proj", ["*q_proj"], True),
        ("model.layers.7.self_attn.q_proj", ["*.Q_PROJ"], False),  # case-sensitive
        ("model.lm_head_norm", ["lm_head"], False),  # whole components only
        ("model.layers.0.mlp.gate_proj", None, False),
        ("model.layers.0.mlp.gate_proj", [], False),
    ],
)
def test_is_module_excluded(name: str, patterns: list[str] | None, excluded: bool) -> None:
    assert is_module_excluded(name, patterns) is excluded
    assert QuantConfig(exclude_modules=patterns).is_excluded(name) is excluded


AWQ_HF = {
    "quant_method": "awq",
    "version": "gemm",
    "bits": 4,
    "group_size": 128,
    "zero_point": True,
}
GPTQ_HF = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def test_from_hf_awq() -> None:
    cfg = QuantConfig.from_hf_quantization_config(
        {**AWQ_HF, "version": "GEMM", "modules_to_not_convert": None}
    )
    assert cfg == QuantConfig(quant_algo="W4A16_AWQ", group_size=128, has_zero_point=True)
    autoawq = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": False}
    assert QuantConfig.from_hf_quantization_config(autoawq) == QuantConfig(
        quant_algo="W4A16_AWQ", group_size=64
    )


def test_from_hf_gptq() -> None:
    cfg = QuantConfig.from_hf_quantization_config(
        {**GPTQ_HF, "bits": 8, "group_size": -1, "sym": False, "damp_percent": 0.01}
    )
    assert cfg == QuantConfig(quant_algo="W8A16_GPTQ", group_size=-1, has_zero_point=True)


def test_from_hf_fp8() -> None:
    cfg = QuantConfig.from_hf_quantization_config(
        {
            "quant_method": "fp8",
            "activation_scheme": "static",
            "modules_to_not_convert": ["lm_head"],
        }
    )
    assert cfg.quant_algo is QuantAlgo.FP8 and cfg.activation_scheme == "static"
    assert cfg.exclude_modules == ("lm_head",)


@pytest.mark.parametrize(
    ("hf", "error", "words"),
    [
        ({**GPTQ_HF, "desc_act": True}, NotImplementedError, "desc_act"),
        ({**GPTQ_HF, "bits": 3}, ValueError, "bits"),
        ({**GPTQ_HF, "checkpoint_format": "gptq_v2"}, NotImplementedError, "gptq_v2"),
        ({**GPTQ_HF, "group_size": 48}, ValueError, "group_size"),
        ({**AWQ_HF, "version": "gemv"}, NotImplementedError, "gemv"),
        ({**AWQ_HF, "bits": 8}, ValueError, "bits"),
        ({**AWQ_HF, "group_size": 32}, ValueError, "group_size"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128]},
            NotImplementedError,
            "weight_block_size",
        ),
        ({"quant_method": "fp8", "activation_scheme": "tensor"}, ValueError, "activation_scheme"),
        ({"quant_method": "bitsandbytes"}, NotImplementedError, "bitsandbytes"),
        ({"bits": 4}, ValueError, "quant_method"),
    ],
)
def test_from_hf_rejects(hf: dict, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        QuantConfig.from_hf_quantization_config(hf)


@pytest.mark.parametrize(
    "hf",
    [
        AWQ_HF,
        {**AWQ_HF, "group_size": 64, "zero_point": False, "modules_to_not_convert": ["lm_head"]},
        GPTQ_HF,
        {**GPTQ_HF, "bits": 8, "group_size": -1, "sym": False},
        {"quant_method": "fp8", "activation_scheme": "dynamic"},
        {"quant_method": "fp8", "activation_scheme": "static", "modules_to_not_convert": ["x"]},
    ],
)
def test_hf_round_trip(hf: dict) -> None:
    cfg = QuantConfig.from_hf_quantization_config(hf)
    assert cfg.to_hf_quantization_config() == hf
    assert QuantConfig.from_hf_quantization_config(cfg.to_hf_quantization_config()) == cfg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quant_algo": "W8A16"},
        {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
        {},
        {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
        {"quant_algo": "W4A16_AWQ", "pre_quant_scale": True},
    ],
)
def test_to_hf_rejects_configs_without_hf_form(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Hugging Face"):
        QuantConfig(**kwargs).to_hf_quantization_config()


def test_fp8_weight_rounding_is_not_written_to_checkpoints() -> None:
    """A calibration-time option: the written config reads back as the default (whose
    loader finds FP8 weights and never calibrates them)."""
    from rtllm.quantization.linear_method import needs_calibration

    assert QuantConfig().fp8_weight_rounding == "gptq"
    for algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        for rounding in ("gptq", "nearest"):
            cfg = QuantConfig(quant_algo=algo, fp8_weight_rounding=rounding)
            assert cfg.gptq_fp8_rounding == (rounding == "gptq") == needs_calibration(cfg)
            written = cfg.to_checkpoint_quantization_config()
            assert "fp8_weight_rounding" not in written
            assert QuantConfig.from_hf_quantization_config(written) == QuantConfig(quant_algo=algo)
    assert not QuantConfig(quant_algo="W4A16_GPTQ").gptq_fp8_rounding
