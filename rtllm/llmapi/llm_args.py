"""Configuration of the LLM API, with TensorRT-LLM's names.

Every config is a frozen dataclass validated on construction; errors name the
field, the value given and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rtllm.engine.capacity_scheduler import CapacitySchedulerPolicy
from rtllm.quantization.config import QuantConfig

__all__ = ["CapacitySchedulerPolicy", "CudaGraphConfig", "KvCacheConfig", "LlmArgs", "SchedulerConfig"]


def _check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class KvCacheConfig:
    """Paged KV cache settings.

    Attributes:
        tokens_per_block: Tokens held by one KV block (a power of two, 1..1024).
        max_tokens: Size of the KV pool in tokens; None sizes it from free memory.
        free_gpu_memory_fraction: Fraction of free GPU memory (after weights and
            activations) given to the KV pool, in (0, 1].
        enable_block_reuse: Reuse the KV of full blocks across requests sharing a
            prefix (prefix caching): blocks are matched by a hash chained over the
            prefix, and free blocks keep their KV in an LRU until the space is needed.
        host_cache_size: Bytes of host memory for a second tier: reusable blocks
            evicted from the device pool are copied there and copied back on a later
            hit instead of being recomputed. None or 0 disables it; needs block reuse.
        event_buffer_max_size: Keep up to this many KV cache events (blocks stored,
            removed, moved between tiers) for ``LLM.get_kv_cache_events``; 0 disables them.
    """

    tokens_per_block: int = 32
    max_tokens: int | None = None
    free_gpu_memory_fraction: float = 0.9
    enable_block_reuse: bool = True
    host_cache_size: int | None = None
    event_buffer_max_size: int = 0

    def __post_init__(self) -> None:
        _check_positive_int("tokens_per_block", self.tokens_per_block)
        if self.tokens_per_block & (self.tokens_per_block - 1) or self.tokens_per_block > 1024:
            raise ValueError(
                f"tokens_per_block must be a power of two in [1, 1024], got {self.tokens_per_block}"
            )
        _check_positive_int("max_tokens", self.max_tokens, allow_none=True)
        fraction = self.free_gpu_memory_fraction
        if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
            raise ValueError(
                f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction!r}"
            )
        if not isinstance(self.enable_block_reuse, bool):
            raise ValueError(f"enable_block_reuse must be a bool, got {self.enable_block_reuse!r}")
        if self.host_cache_size is not None:
            size = self.host_cache_size
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"host_cache_size must be a number of bytes >= 0, got {size!r}")
            if size and not self.enable_block_reuse:
                raise ValueError("host_cache_size needs enable_block_reuse=True (the host tier holds reusable blocks)")
        size = self.event_buffer_max_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"event_buffer_max_size must be an integer >= 0 (0 disables events), got {size!r}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Scheduling policy.

    Attributes:
        capacity_scheduler_policy: Admission policy against the KV cache:
            GUARANTEED_NO_EVICT (default) admits a request only when its blocks to
            completion fit; MAX_UTILIZATION admits greedily and pauses the most
            recently admitted requests when blocks run out (they resume later by
            recomputation); STATIC_BATCH admits a new batch only when the previous
            one has finished.
    """

    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT

    def __post_init__(self) -> None:
        try:
            policy = CapacitySchedulerPolicy(self.capacity_scheduler_policy)
        except ValueError:
            allowed = ", ".join(p.value for p in CapacitySchedulerPolicy)
            raise ValueError(
                f"capacity_scheduler_policy must be one of {allowed}, "
                f"got {self.capacity_scheduler_policy!r}"
            ) from None
        object.__setattr__(self, "capacity_scheduler_policy", policy)


@dataclass(frozen=True, slots=True)
class CudaGraphConfig:
    """CUDA graphs for generation steps (used on CUDA only).

    Attributes:
        batch_sizes: Batch sizes to capture; None derives them from ``max_batch_size``
            (1, 2, 4, 8, then steps of 8, 16 and 32).
        max_batch_size: Largest batch size captured when ``batch_sizes`` is None.
        enable_padding: Pad a batch up to the next captured size (otherwise only
            exactly captured sizes replay).
    """

    batch_sizes: tuple[int, ...] | None = None
    max_batch_size: int = 256
    enable_padding: bool = True

    def __post_init__(self) -> None:
        _check_positive_int("max_batch_size", self.max_batch_size)
        if self.batch_sizes is not None:
            sizes = tuple(self.batch_sizes)
            for size in sizes:
                _check_positive_int("batch_sizes entries", size)
            if not sizes:
                raise ValueError("batch_sizes must not be empty (use cuda_graph_config=None to disable graphs)")
            object.__setattr__(self, "batch_sizes", tuple(sorted(set(sizes))))


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Turn the user's ``dtype`` into a torch dtype.

    ``"auto"`` takes the checkpoint's dtype on GPU and float32 on CPU, where
    half-precision matmuls are slow or missing.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


@dataclass(frozen=True, slots=True)
class LlmArgs:
    """All arguments of :class:`rtllm.LLM`.

    Attributes:
        model: Hugging Face model directory or GGUF file; None takes the embedded
            default model (SmolLM2-135M-Instruct).
        tokenizer: Tokenizer source when it differs from ``model``.
        dtype: "auto", "float32", "float16" or "bfloat16".
        device: "cpu", "cuda" or "cuda:N"; None picks CUDA when available.
        max_batch_size: Most requests in one engine step.
        max_num_tokens: Most tokens (context + generation) in one engine step.
        max_seq_len: Longest prompt + output; None takes the model's limit.
        enable_chunked_prefill: Split prompts longer than the step budget across steps.
        kv_cache_config: See :class:`KvCacheConfig`.
        scheduler_config: See :class:`SchedulerConfig`.
        skip_tokenizer_init: Work on token ids only (no text in, no text out).
        seed: Seed of the engine's generator for requests without their own seed
            (and of the random weights of ``load_format="dummy"``).
        load_format: "auto" reads the checkpoint; "dummy" fills random weights
            (benchmarks of a model shape without its weights).
        cuda_graph_config: CUDA graphs for generation steps on CUDA; None disables them.
        disable_overlap_scheduler: True runs each step to completion before the
            next is prepared; False overlaps host preparation of step N+1 with the
            device running step N; None (default) overlaps on CUDA only.
        enable_iter_perf_stats: Collect per-iteration and per-request stats for
            ``LLM.get_stats``.
        iter_stats_max_iterations: Most iterations of stats kept until read (oldest
            dropped first); None keeps 1000.
        max_beam_width: Largest beam width a request may ask for (``use_beam_search``
            with ``best_of``/``n`` beams).
        quant_config: Quantization (:class:`rtllm.quantization.QuantConfig`) applied
            on load; None loads the checkpoint as it is (pre-quantized checkpoints
            carry their own ``quantization_config``).
        tensor_parallel_size: Ranks sharing every layer (heads, MLP columns and the
            vocabulary split over them).
        pipeline_parallel_size: Stages of contiguous layers. With a world size
            (tensor * pipeline) above 1 the LLM runs one worker process per rank on this
            node (gloo on CPU, NCCL on GPU).
    """

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    max_seq_len: int | None = None
    enable_chunked_prefill: bool = False
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    skip_tokenizer_init: bool = False
    seed: int = 0
    load_format: str = "auto"
    cuda_graph_config: CudaGraphConfig | None = field(default_factory=CudaGraphConfig)
    disable_overlap_scheduler: bool | None = None
    enable_iter_perf_stats: bool = False
    iter_stats_max_iterations: int | None = None
    max_beam_width: int = 1
    quant_config: QuantConfig | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.cuda_graph_config is not None and not isinstance(self.cuda_graph_config, CudaGraphConfig):
            raise ValueError(
                f"cuda_graph_config must be a CudaGraphConfig or None, got {type(self.cuda_graph_config).__name__}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        _check_positive_int("max_batch_size", self.max_batch_size)
        _check_positive_int("max_num_tokens", self.max_num_tokens)
        _check_positive_int("max_seq_len", self.max_seq_len, allow_none=True)
        _check_positive_int("iter_stats_max_iterations", self.iter_stats_max_iterations, allow_none=True)
        _check_positive_int("max_beam_width", self.max_beam_width)
        _check_positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _check_positive_int("pipeline_parallel_size", self.pipeline_parallel_size)
        if self.quant_config is not None and not isinstance(self.quant_config, QuantConfig):
            raise ValueError(f"quant_config must be a QuantConfig or None, got {type(self.quant_config).__name__}")
        if not isinstance(self.enable_iter_perf_stats, bool):
            raise ValueError(f"enable_iter_perf_stats must be a bool, got {self.enable_iter_perf_stats!r}")
        if not isinstance(self.kv_cache_config, KvCacheConfig):
            raise ValueError(f"kv_cache_config must be a KvCacheConfig, got {type(self.kv_cache_config).__name__}")
        if not isinstance(self.scheduler_config, SchedulerConfig):
            raise ValueError(
                f"scheduler_config must be a SchedulerConfig, got {type(self.scheduler_config).__name__}"
            )
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        if isinstance(self.dtype, torch.dtype):
            if self.dtype not in _DTYPES.values():
                raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        elif self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
