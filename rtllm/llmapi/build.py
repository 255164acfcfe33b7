"""Assembles model, KV cache, scheduler, sampler and engine from :class:`LlmArgs`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from rtllm.engine.engine import Engine, EngineLimits
from rtllm.engine.kv_cache.kv_cache_manager import KVCacheManager
from rtllm.engine.sampler import Sampler
from rtllm.engine.scheduler import Scheduler
from rtllm.llmapi.llm_args import LlmArgs, resolve_dtype
from rtllm.models.config import ModelConfig
from rtllm.models.loader import build_model, load_model_config
from rtllm.runtime.memory import num_kv_blocks
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


def resolve_model_path(model: str | None) -> str:
    """The user's model path, or the embedded default model when None."""
    if model is not None:
        return model
    from rtllm.models.default_model import default_model_path

    return default_model_path()


def build_engine(args: LlmArgs) -> BuiltEngine:
    """Load the model and tokenizer and wire up an :class:`Engine`."""
    path = resolve_model_path(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = load_model_config(path)
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
    model = build_model(path, config, dtype, device, args.load_format, args.seed)
    kv_config = args.kv_cache_config
    num_blocks = num_kv_blocks(config, kv_config, dtype, device, max_seq_len, args.max_batch_size)
    runner = ModelRunner(model, config, dtype, device, num_blocks, kv_config.tokens_per_block)
    kv_cache = KVCacheManager(num_blocks, kv_config.tokens_per_block)
    scheduler = Scheduler(kv_cache, args.max_batch_size, args.max_num_tokens, args.enable_chunked_prefill)
    limits = EngineLimits(max_seq_len, args.max_num_tokens, config.vocab_size, args.enable_chunked_prefill)
    overlap = device.type == "cuda" if args.disable_overlap_scheduler is None else not args.disable_overlap_scheduler
    engine = Engine(runner, kv_cache, scheduler, Sampler(device, args.seed), limits, overlap=overlap)
    end_ids = config.eos_token_ids
    if not end_ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        end_ids = (tokenizer.eos_token_id,)
    return BuiltEngine(engine, config, path, tokenizer, end_ids, dtype, device)
