"""Runs one scheduled step on the model: batch assembly, attention metadata, forward.

The runner executes; it never decides. It owns the KV cache tensors, whose
blocks the engine's KV cache manager hands out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rtllm.engine.scheduler import ScheduledRequest
from rtllm.layers.attention_backends import StepAttentionInputs, get_attention_backend
from rtllm.models.config import ModelConfig
from rtllm.runtime.forward_context import ForwardContext, forward_context

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TokenSources:
    """Input tokens that are still on the device: ``input_ids[dst[i]] = tokens[src[i]]``."""

    tokens: torch.Tensor
    dst: list[int]
    src: list[int]


class ModelRunner:
    """Executes packed steps of ``model`` over a paged KV cache of ``num_blocks`` blocks."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int,
        tokens_per_block: int,
        attention_backend: str = "torch",
    ) -> None:
        self.model = model
        self.config = config
        self.dtype = dtype
        self.device = device
        self.tokens_per_block = tokens_per_block
        self.num_blocks = num_blocks
        self.backend = get_attention_backend(attention_backend)
        shape = (2, num_blocks, tokens_per_block, config.num_key_value_heads, config.head_dim)
        # Zeroed, not empty: attention backends may read whole blocks past a sequence's
        # end (masked out), and never-written memory could hold NaN, which a zero
        # attention weight does not cancel (0 * NaN = NaN).
        self.kv_caches = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        logger.info(
            "KV cache: %d blocks x %d tokens, %.1f MiB",
            num_blocks,
            tokens_per_block,
            sum(t.numel() * t.element_size() for t in self.kv_caches) / 2**20,
        )

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledRequest],
        block_table_of: Callable[[int], list[int]],
        token_sources: TokenSources | None = None,
    ) -> torch.Tensor:
        """Run one forward pass; returns float32 logits ``[num_sampling_requests, vocab]``
        in the order of the scheduled requests that sample this step.

        ``token_sources`` fills input positions whose token was sampled by the
        previous, not yet committed, step (overlap loop).
        """
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        logits_indices: list[int] = []
        for item in scheduled:
            request = item.request
            start, count = request.num_computed_tokens, item.num_new_tokens
            input_ids.extend(request.tokens_slice(start, start + count))
            positions.extend(range(start, start + count))
            query_lens.append(count)
            context_lens.append(start)
            block_tables.append(block_table_of(request.request_id))
            if item.samples:
                logits_indices.append(len(input_ids) - 1)
        metadata = self.backend.build_metadata(
            StepAttentionInputs(query_lens, context_lens, block_tables, self.tokens_per_block, self.device)
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        if token_sources is not None:
            dst = torch.tensor(token_sources.dst, dtype=torch.long, device=self.device)
            src = torch.tensor(token_sources.src, dtype=torch.long, device=self.device)
            ids.index_copy_(0, dst, token_sources.tokens.index_select(0, src))
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with forward_context(ForwardContext(self.backend, metadata, self.kv_caches)):
            hidden = self.model(ids, pos)
        if not logits_indices:
            return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        if len(logits_indices) < hidden.shape[0]:
            hidden = hidden[torch.tensor(logits_indices, device=self.device)]
        return self.model.compute_logits(hidden).float()
