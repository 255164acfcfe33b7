"""Assembles model, KV cache, scheduler, sampler and engine from :class:`LlmArgs`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from rtllm.distributed.parallel_state import get_mapping
from rtllm.engine.engine import Engine, EngineLimits
from rtllm.engine.kv_cache.events import KVCacheEventBuffer
from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.sampler import Sampler
from rtllm.engine.scheduler import Scheduler
from rtllm.kernels.kv_quant import kv_cache_dtype_of
from rtllm.llmapi.llm_args import LlmArgs, resolve_dtype
from rtllm.models.config import ModelConfig
from rtllm.models.loader import build_model, estimate_weight_bytes, load_model_config
from rtllm.quantization.checkpoint import resolve_quant_config
from rtllm.runtime.cuda_graph import CudaGraphRunner, default_graph_batch_sizes
from rtllm.runtime.memory import MemoryPlan, check_weights_fit, kv_bytes_per_block, num_kv_blocks
from rtllm.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class BuiltEngine:
    """Everything :class:`rtllm.LLM` needs from the build."""

    engine: Engine
    model_config: ModelConfig
    model_path: str
    tokenizer: Any | None
    end_ids: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    kv_events: KVCacheEventBuffer | None = None


def resolve_model_path(model: str | None) -> str:
    """The user's model path, or the embedded default model when None."""
    if model is not None:
        return model
    from rtllm.models.default_model import default_model_path

    return default_model_path()


def build_engine(args: LlmArgs, device: torch.device | None = None) -> BuiltEngine:
    """Load the model and tokenizer and wire up an :class:`Engine`.

    In a parallel worker (the process's :class:`~rtllm.distributed.Mapping` has
    ``world_size > 1``) the model is this rank's shard, the KV cache holds its heads and
    layers, and the runner is a :class:`~rtllm.distributed.dist_runner.DistributedRunner`
    (rank 0 drives the engine; other ranks only follow its runner).
    """
    path = resolve_model_path(args.model)
    if device is None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = load_model_config(path)
    mapping = get_mapping()
    if mapping.world_size > 1:
        from rtllm.distributed.dist_runner import check_parallel_support

        check_parallel_support(args, device)
    dtype = resolve_dtype(args.dtype, config.checkpoint_dtype, device)
    max_seq_len = args.max_seq_len or config.max_position_embeddings
    if max_seq_len > config.max_position_embeddings:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    tokenizer = None
    if not args.skip_tokenizer_init:
        from rtllm.llmapi.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path, args.tokenizer)
    quant_config = resolve_quant_config(path, args.quant_config)
    check_weights_fit(estimate_weight_bytes(config, dtype, quant_config), device)
    model = build_model(path, config, dtype, device, args.load_format, args.seed, quant_config)
    if device.type == "cuda" and quant_config is not None:
        from rtllm.quantization.dispatch import pack_weight_only_layers

        if pack_weight_only_layers(model):
            torch.cuda.empty_cache()  # the freed codes go back to the pool the KV cache is sized from
    backend = "triton" if device.type == "cuda" else "torch"
    kv_dtype = kv_cache_dtype_of(quant_config)  # None: the model dtype
    from rtllm.distributed.dist_runner import local_model_config

    runner_config = local_model_config(config, mapping)  # this rank's heads and layers
    runner = ModelRunner(
        model, runner_config, dtype, device, args.kv_cache_config.tokens_per_block, backend, kv_dtype
    )
    graph_sizes = _graph_batch_sizes(args, device)
    num_blocks = _plan_kv_cache(runner, args, runner_config, dtype, device, max_seq_len, graph_sizes)
    if mapping.world_size > 1:
        from rtllm.distributed.dist_runner import DistributedRunner, agree_num_blocks

        num_blocks = agree_num_blocks(num_blocks)
    runner.allocate_kv_cache(num_blocks)
    if graph_sizes:
        enable_padding = args.cuda_graph_config.enable_padding
        graphs = CudaGraphRunner(runner, graph_sizes, max_seq_len, enable_padding)
        try:
            graphs.capture()
            runner.graphs = graphs
        except RuntimeError:
            logger.warning("CUDA graph capture failed; generation steps run eagerly", exc_info=True)
            torch.cuda.synchronize(device)
    if mapping.world_size > 1:
        runner = DistributedRunner(runner, mapping)
    kv_cache, kv_events = _build_kv_cache_manager(runner, args, runner_config, dtype, num_blocks)
    scheduler = Scheduler(
        kv_cache,
        args.max_batch_size,
        args.max_num_tokens,
        args.enable_chunked_prefill,
        args.scheduler_config.capacity_scheduler_policy,
    )
    limits = EngineLimits(
        max_seq_len, args.max_num_tokens, config.vocab_size, args.enable_chunked_prefill, args.max_beam_width
    )
    overlap = device.type == "cuda" if args.disable_overlap_scheduler is None else not args.disable_overlap_scheduler
    engine = Engine(runner, kv_cache, scheduler, Sampler(device, args.seed), limits, overlap=overlap)
    end_ids = config.eos_token_ids
    if not end_ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        end_ids = (tokenizer.eos_token_id,)
    return BuiltEngine(engine, config, path, tokenizer, end_ids, dtype, device, kv_events)


def _build_kv_cache_manager(
    runner: ModelRunner, args: LlmArgs, config: ModelConfig, dtype: torch.dtype, num_blocks: int
) -> tuple[KVCacheManager, KVCacheEventBuffer | None]:
    """The block manager, with its host tier and event buffer when configured."""
    kv_config = args.kv_cache_config
    events = KVCacheEventBuffer(kv_config.event_buffer_max_size) if kv_config.event_buffer_max_size else None
    host_blocks = 0
    if kv_config.host_cache_size:
        per_block = kv_bytes_per_block(config, kv_config.tokens_per_block, dtype, runner.kv_cache_dtype)
        host_blocks = kv_config.host_cache_size // per_block
        if host_blocks < 1:
            raise ValueError(
                f"host_cache_size={kv_config.host_cache_size} bytes is smaller than one KV block "
                f"({per_block} bytes)"
            )
        runner.allocate_host_cache(host_blocks)
    kv_cache = KVCacheManager(
        num_blocks,
        kv_config.tokens_per_block,
        enable_block_reuse=kv_config.enable_block_reuse,
        host_cache_blocks=host_blocks,
        copier=runner,
        events=events,
    )
    return kv_cache, events


def _graph_batch_sizes(args: LlmArgs, device: torch.device) -> list[int]:
    graph_config = args.cuda_graph_config
    if device.type != "cuda" or graph_config is None:
        return []
    if graph_config.batch_sizes is not None:
        return [s for s in graph_config.batch_sizes if s <= args.max_batch_size]
    return default_graph_batch_sizes(min(graph_config.max_batch_size, args.max_batch_size))


#: Context-step sizes run once at start-up: one per tile bucket of the quantized GEMMs
#: (rtllm.kernels.quant_tuning.candidates: M <= 16, <= 32, <= 64, larger).
_WARM_UP_SIZES = (16, 32, 64, 128)


def _plan_kv_cache(
    runner: ModelRunner,
    args: LlmArgs,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_seq_len: int,
    graph_sizes: list[int],
) -> int:
    """Size the KV pool; on CUDA after profiling activations (and graph memory)."""
    kv_config = args.kv_cache_config
    kv_dtype = runner.kv_cache_dtype
    if device.type != "cuda":
        return num_kv_blocks(
            config, kv_config, dtype, device, max_seq_len, args.max_batch_size, kv_cache_dtype=kv_dtype
        )
    weights = torch.cuda.memory_allocated(device)
    activations = runner.profile_peak_memory(args.max_num_tokens, max_seq_len)
    runner.warm_up_context_sizes(tuple(n for n in _WARM_UP_SIZES if n < args.max_num_tokens), max_seq_len)
    # Graph capture keeps the activations of its largest batch in a private pool,
    # plus one shared float32 logits buffer.
    graphs = 0
    if graph_sizes:
        largest = max(graph_sizes)
        graphs = runner.profile_peak_memory(largest, max_seq_len) + largest * config.vocab_size * 4
    num_blocks = num_kv_blocks(
        config, kv_config, dtype, device, max_seq_len, args.max_batch_size, activations + graphs, kv_dtype
    )
    per_block = kv_bytes_per_block(config, kv_config.tokens_per_block, dtype, kv_dtype)
    plan = MemoryPlan(weights, activations, graphs, num_blocks * per_block, num_blocks)
    logger.info("memory plan: %s", plan.describe())
    return num_blocks
