"""Tests for rtllm.llmapi.llm_args: KvCacheConfig, SchedulerConfig, LlmArgs, resolve_dtype."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from rtllm import LLM, CapacitySchedulerPolicy, KvCacheConfig, LlmArgs, SchedulerConfig
from rtllm.llmapi.llm_args import resolve_dtype

# ---- KvCacheConfig ---------------------------------------------------------------------


def test_kv_cache_config_defaults() -> None:
    c = KvCacheConfig()
    assert c.tokens_per_block == 32
    assert c.max_tokens is None
    assert c.free_gpu_memory_fraction == 0.9
    assert c.enable_block_reuse is True
    assert c.host_cache_size is None
    assert c.event_buffer_max_size == 0


@pytest.mark.parametrize("value", [1, 2, 8, 64, 1024])
def test_good_tokens_per_block(value: int) -> None:
    assert KvCacheConfig(tokens_per_block=value).tokens_per_block == value


@pytest.mark.parametrize("value", [0, -8, 3, 12, 2048, 4096, 2.0, "32", True, None])
def test_bad_tokens_per_block(value: Any) -> None:
    with pytest.raises(ValueError, match="tokens_per_block"):
        KvCacheConfig(tokens_per_block=value)


def test_tokens_per_block_message_says_power_of_two() -> None:
    with pytest.raises(ValueError, match=r"power of two in \[1, 1024\], got 48"):
        KvCacheConfig(tokens_per_block=48)


@pytest.mark.parametrize("value", [0, -1, 1.5, "100", True])
def test_bad_max_tokens(value: Any) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        KvCacheConfig(max_tokens=value)


@pytest.mark.parametrize("value", [None, 1, 100, 2048])
def test_good_max_tokens(value: int | None) -> None:
    assert KvCacheConfig(max_tokens=value).max_tokens == value


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2, float("nan")])
def test_bad_free_gpu_memory_fraction(value: float) -> None:
    with pytest.raises(ValueError, match="free_gpu_memory_fraction"):
        KvCacheConfig(free_gpu_memory_fraction=value)


@pytest.mark.parametrize("value", [1e-3, 0.5, 1.0, 1])
def test_good_free_gpu_memory_fraction(value: float) -> None:
    assert KvCacheConfig(free_gpu_memory_fraction=value).free_gpu_memory_fraction == value


def test_free_gpu_memory_fraction_string() -> None:
    with pytest.raises(ValueError, match="free_gpu_memory_fraction"):
        KvCacheConfig(free_gpu_memory_fraction="0.5")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"enable_block_reuse": 1}, "enable_block_reuse"),
        ({"host_cache_size": -1}, "host_cache_size"),
        ({"host_cache_size": 1.5}, "host_cache_size"),
        ({"host_cache_size": 1 << 20, "enable_block_reuse": False}, "host_cache_size"),
        ({"event_buffer_max_size": -3}, "event_buffer_max_size"),
        ({"event_buffer_max_size": True}, "event_buffer_max_size"),
    ],
)
def test_kv_cache_config_rejects_bad_reuse_settings(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        KvCacheConfig(**kwargs)


def test_kv_cache_config_reuse_settings() -> None:
    c = KvCacheConfig(host_cache_size=1 << 30, event_buffer_max_size=100)
    assert (c.host_cache_size, c.event_buffer_max_size) == (1 << 30, 100)
    assert KvCacheConfig(enable_block_reuse=False, host_cache_size=0).host_cache_size == 0


def test_kv_cache_config_is_frozen() -> None:
    c = KvCacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tokens_per_block = 16  # type: ignore[misc]


# ---- SchedulerConfig -------------------------------------------------------------------


def test_scheduler_config_default_policy() -> None:
    c = SchedulerConfig()
    assert c.capacity_scheduler_policy is CapacitySchedulerPolicy.GUARANTEED_NO_EVICT


def test_scheduler_config_accepts_policy_string() -> None:
    c = SchedulerConfig(capacity_scheduler_policy="GUARANTEED_NO_EVICT")  # type: ignore[arg-type]
    assert c.capacity_scheduler_policy is CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    assert SchedulerConfig(CapacitySchedulerPolicy.GUARANTEED_NO_EVICT) == c


@pytest.mark.parametrize(
    "policy",
    [
        CapacitySchedulerPolicy.MAX_UTILIZATION,
        CapacitySchedulerPolicy.STATIC_BATCH,
        "MAX_UTILIZATION",
        "STATIC_BATCH",
    ],
)
def test_other_policies_accepted(policy: Any) -> None:
    c = SchedulerConfig(capacity_scheduler_policy=policy)
    assert c.capacity_scheduler_policy is CapacitySchedulerPolicy(policy)


@pytest.mark.parametrize("policy", ["bogus", "", None, 3, "guaranteed-no-evict"])
def test_unknown_policy_names_allowed_values(policy: Any) -> None:
    with pytest.raises(ValueError, match="capacity_scheduler_policy") as info:
        SchedulerConfig(capacity_scheduler_policy=policy)
    message = str(info.value)
    for allowed in ("MAX_UTILIZATION", "GUARANTEED_NO_EVICT", "STATIC_BATCH"):
        assert allowed in message
    assert repr(policy) in message


def test_scheduler_config_is_frozen() -> None:
    c = SchedulerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.capacity_scheduler_policy = CapacitySchedulerPolicy.STATIC_BATCH  # type: ignore[misc]


# ---- LlmArgs ---------------------------------------------------------------------------


def test_llm_args_defaults() -> None:
    a = LlmArgs()
    assert a.model is None
    assert a.dtype == "auto"
    assert a.max_batch_size == 256
    assert a.max_num_tokens == 8192
    assert a.max_seq_len is None
    assert a.enable_chunked_prefill is False
    assert a.kv_cache_config == KvCacheConfig()
    assert a.scheduler_config == SchedulerConfig()
    assert a.load_format == "auto"
    assert a.skip_tokenizer_init is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", -1),
        ("max_batch_size", 2.0),
        ("max_batch_size", True),
        ("max_num_tokens", 0),
        ("max_num_tokens", "8192"),
        ("max_seq_len", 0),
        ("max_seq_len", -5),
        ("max_seq_len", 1.5),
        ("load_format", "safetensors"),
        ("load_format", None),
        ("dtype", "int8"),
        ("dtype", "fp16"),
        ("dtype", None),
        ("device", "gpu"),
        ("device", "cuda:x"),
        ("kv_cache_config", {"tokens_per_block": 8}),
        ("kv_cache_config", None),
        ("scheduler_config", "GUARANTEED_NO_EVICT"),
        ("scheduler_config", None),
    ],
)
def test_bad_llm_args_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        LlmArgs(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 1),
        ("max_num_tokens", 1),
        ("max_seq_len", None),
        ("max_seq_len", 128),
        ("load_format", "dummy"),
        ("dtype", "float32"),
        ("dtype", "float"),
        ("dtype", "float16"),
        ("dtype", "half"),
        ("dtype", "bfloat16"),
        ("dtype", torch.bfloat16),
        ("device", "cpu"),
        ("device", "cuda"),
        ("device", "cuda:1"),
        ("enable_chunked_prefill", True),
    ],
)
def test_good_llm_args(field: str, value: Any) -> None:
    assert getattr(LlmArgs(**{field: value}), field) == value


def test_llm_args_messages_show_value() -> None:
    with pytest.raises(ValueError, match=r"max_batch_size must be a positive integer, got 0"):
        LlmArgs(max_batch_size=0)
    with pytest.raises(ValueError, match=r"load_format must be 'auto' or 'dummy', got 'x'"):
        LlmArgs(load_format="x")
    with pytest.raises(ValueError, match=r"kv_cache_config must be a KvCacheConfig, got dict"):
        LlmArgs(kv_cache_config={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dtype must be one of auto, .*bfloat16.*got 'int4'"):
        LlmArgs(dtype="int4")


def test_llm_args_rejects_unsupported_torch_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        LlmArgs(dtype=torch.int8)  # type: ignore[arg-type]


def test_llm_args_is_frozen() -> None:
    a = LlmArgs()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.max_batch_size = 1  # type: ignore[misc]


def test_llm_rejects_unknown_kwargs_before_loading() -> None:
    with pytest.raises(ValueError, match=r"unknown LLM argument\(s\) \['bogus_arg'\]"):
        LLM(model="/nonexistent/model", bogus_arg=1)


def test_llm_validates_args_before_loading() -> None:
    with pytest.raises(ValueError, match="max_num_tokens"):
        LLM(model="/nonexistent/model", max_num_tokens=0)
    with pytest.raises(ValueError, match="host_cache_size"):
        LLM(model="/nonexistent/model", kv_cache_config=KvCacheConfig(enable_block_reuse=False, host_cache_size=64))
    with pytest.raises(ValueError, match="iter_stats_max_iterations"):
        LLM(model="/nonexistent/model", iter_stats_max_iterations=0)


# ---- resolve_dtype ---------------------------------------------------------------------

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("dtype", "checkpoint", "device", "expected"),
    [
        ("auto", torch.bfloat16, CPU, torch.float32),
        ("auto", torch.float16, CPU, torch.float32),
        ("auto", torch.bfloat16, CUDA, torch.bfloat16),
        ("auto", torch.float16, CUDA, torch.float16),
        ("auto", torch.float32, CUDA, torch.bfloat16),
        ("float16", torch.bfloat16, CPU, torch.float16),
        ("half", torch.float32, CUDA, torch.float16),
        ("float", torch.bfloat16, CUDA, torch.float32),
        ("bfloat16", torch.float32, CPU, torch.bfloat16),
        (torch.float16, torch.bfloat16, CPU, torch.float16),
    ],
)
def test_resolve_dtype(
    dtype: Any, checkpoint: torch.dtype, device: torch.device, expected: torch.dtype
) -> None:
    assert resolve_dtype(dtype, checkpoint, device) == expected


@pytest.mark.parametrize("dtype", ["int8", "fp8", torch.int8, torch.float64])
def test_resolve_dtype_rejects(dtype: Any) -> None:
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype(dtype, torch.float32, CPU)
