"""Runs one scheduled step on the model: batch assembly, attention metadata, forward.

The runner executes; it never decides. It owns the KV cache tensors, whose
blocks the engine's KV cache manager hands out, and (on CUDA) the captured CUDA
graphs that replay generation steps.

With a quantized KV cache (``kv_cache_dtype`` int8 / float8_e4m3fn) each layer's cache
is a :class:`QuantizedKVCache` of codes plus per-(token, head) scales; every block
operation here (lazy zeroing, host-tier offload/onload, copy-on-write ``copy_block``)
moves both, through :func:`kv_cache_parts`, so a block's scales always travel with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rtllm.distributed.parallel_state import wait_sends
from rtllm.engine.llm_request import LlmRequest, SamplingConfig
from rtllm.engine.scheduler import ScheduledRequest
from rtllm.kernels.kv_quant import KVCacheLayer, allocate_kv_layer, kv_cache_parts
from rtllm.layers.attention_backends import StepAttentionInputs, get_attention_backend
from rtllm.models.config import ModelConfig
from rtllm.runtime.forward_context import ForwardContext, forward_context
from rtllm.runtime.transfer import to_device

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TokenSources:
    """Input tokens that are still on the device: ``input_ids[dst[i]] = tokens[src[i]]``."""

    tokens: torch.Tensor
    dst: list[int]
    src: list[int]


@dataclass(slots=True)
class StepInputs:
    """Host-side description of one step, as the runner assembles it."""

    input_ids: list[int]
    positions: list[int]
    attention: StepAttentionInputs
    logits_indices: list[int]

    @property
    def is_generation_only(self) -> bool:
        """Every sequence computes exactly one token and samples it."""
        return len(self.logits_indices) == len(self.input_ids) == len(self.attention.query_lens)


class ModelRunner:
    """Executes packed steps of ``model`` over a paged KV cache."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        tokens_per_block: int,
        attention_backend: str = "torch",
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.dtype = dtype
        self.device = device
        self.tokens_per_block = tokens_per_block
        self.backend = get_attention_backend(attention_backend)
        # The KV element type: the model dtype, or int8 / float8_e4m3fn (quantized).
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.kv_caches: list[KVCacheLayer] = []
        self.host_kv_caches: list[KVCacheLayer] = []  # the host tier, same layout
        self.num_blocks = 0
        self._num_clean_blocks = 0
        self.graphs = None  # a CudaGraphRunner once captured
        # False on an earlier pipeline stage (no LM head: it computes no logits).
        self.holds_lm_head = getattr(model, "lm_head", None) is not None

    def _new_layers(self, num_blocks: int, device: torch.device, host: bool) -> list[KVCacheLayer]:
        config = self.config
        return [
            allocate_kv_layer(
                num_blocks,
                self.tokens_per_block,
                config.num_key_value_heads,
                config.head_dim,
                self.kv_cache_dtype,
                device,
                zero=host,
                pin_memory=host and self.device.type == "cuda",
            )
            for _ in range(config.num_hidden_layers)
        ]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV pool: one ``[2, num_blocks, tokens_per_block, kv_heads, head_dim]``
        tensor per layer (with its scale tensor when quantized)."""
        # Allocated empty and zeroed lazily, block by block on first use (see
        # _zero_new_blocks): touching a whole CPU pool up front costs seconds.
        self.kv_caches = self._new_layers(num_blocks, self.device, host=False)
        self.num_blocks = num_blocks
        self._num_clean_blocks = 0
        logger.info(
            "KV cache (%s): %d blocks x %d tokens = %d tokens, %.1f MiB",
            self.kv_cache_dtype,
            num_blocks,
            self.tokens_per_block,
            num_blocks * self.tokens_per_block,
            _mib(self.kv_caches),
        )

    def allocate_host_cache(self, num_blocks: int) -> None:
        """Allocate the host tier: ``num_blocks`` blocks per layer in host memory
        (pinned on CUDA, so copies to and from the device run asynchronously)."""
        self.host_kv_caches = self._new_layers(num_blocks, torch.device("cpu"), host=True)
        logger.info("host KV tier: %d blocks, %.1f MiB", num_blocks, _mib(self.host_kv_caches))

    def offload(self, device_block: int, host_block: int) -> None:
        """Copy one block's KV (every layer) to the host tier.

        Queued on the current stream: it sees every write of the steps launched
        before it, and the step that reuses ``device_block`` runs after it.
        """
        for device_part, host_part in self._paired_parts():
            host_part[:, host_block].copy_(device_part[:, device_block], non_blocking=True)

    def onload(self, host_block: int, device_block: int) -> None:
        """Copy one block's KV (every layer) from the host tier into the device pool."""
        # Zero first what lazy zeroing has not reached yet, so it cannot later wipe this copy.
        self._zero_new_blocks(device_block)
        for device_part, host_part in self._paired_parts():
            device_part[:, device_block].copy_(host_part[:, host_block], non_blocking=True)

    def _paired_parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device, host) tensor pairs over every layer: codes and scales alike."""
        pairs = []
        for device_layer, host_layer in zip(self.kv_caches, self.host_kv_caches, strict=True):
            pairs.extend(zip(kv_cache_parts(device_layer), kv_cache_parts(host_layer), strict=True))
        return pairs

    def copy_block(self, src_block: int, dst_block: int) -> None:
        """Copy one block's KV (every layer) to another block of the pool (queued on the
        current stream, after the steps that wrote ``src_block``)."""
        self._zero_new_blocks(dst_block)
        for layer in self.kv_caches:
            for part in kv_cache_parts(layer):
                part[:, dst_block].copy_(part[:, src_block])

    def assemble(
        self, scheduled: list[ScheduledRequest], block_table_of: Callable[[int], list[int]]
    ) -> StepInputs:
        """Pack the scheduled requests' new tokens into one step."""
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
        self._zero_new_blocks(max(max(table, default=0) for table in block_tables))
        attention = StepAttentionInputs(query_lens, context_lens, block_tables, self.tokens_per_block, self.device)
        return StepInputs(input_ids, positions, attention, logits_indices)

    def _zero_new_blocks(self, max_block_id: int) -> None:
        """Zero blocks never used before.

        Backends may read whole blocks past a sequence's end (masked out), and
        never-written memory could hold NaN, which a zero attention weight does not
        cancel (0 * NaN = NaN). A fresh pool hands out block ids in increasing
        order, so the blocks ever used form a prefix ``[0, _num_clean_blocks)``;
        anything in it is either zero or real KV (finite). Quantized caches zero their
        scales too (a zero row dequantizes to 0; float8 garbage could be NaN codes).
        """
        if max_block_id < self._num_clean_blocks:
            return
        end = max_block_id + 1
        for layer in self.kv_caches:
            for part in kv_cache_parts(layer):
                part[:, self._num_clean_blocks : end].zero_()
        self._num_clean_blocks = end

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledRequest],
        block_table_of: Callable[[int], list[int]],
        token_sources: TokenSources | None = None,
        prompt_logits: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run one forward pass; returns float32 logits ``[num_sampling_requests, vocab]``
        in the order of the scheduled requests that sample this step.

        ``token_sources`` fills input positions whose token was sampled by the
        previous, not yet committed, step (overlap loop). When ``prompt_logits`` is
        given, it receives, for each request whose sampling needs them, the float32
        logits of every prompt position computed this step (request id -> ``[n, vocab]``).
        """
        step = self.assemble(scheduled, block_table_of)
        wants_prompt_logits = prompt_logits is not None and any(
            item.request.sampling.needs_prompt_logits for item in scheduled
        )
        if (
            self.graphs is not None
            and step.is_generation_only
            and not wants_prompt_logits
            and self.graphs.can_run(len(step.input_ids))
        ):
            return self.graphs.run(step, token_sources)
        ids = to_device(step.input_ids, torch.long, self.device)
        if token_sources is not None:
            apply_token_sources(ids, token_sources)
        pos = to_device(step.positions, torch.long, self.device)
        metadata = self.backend.build_metadata(step.attention)
        with forward_context(ForwardContext(self.backend, metadata, self.kv_caches)):
            hidden = self.model(ids, pos)
        if wants_prompt_logits:
            self._collect_prompt_logits(scheduled, hidden, prompt_logits)
        if not step.logits_indices or not self.holds_lm_head:
            # (An earlier pipeline stage only runs here while profiling memory.)
            return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        if len(step.logits_indices) < hidden.shape[0]:
            hidden = hidden.index_select(0, to_device(step.logits_indices, torch.long, self.device))
        return self.model.compute_logits(hidden).float()

    def _collect_prompt_logits(
        self, scheduled: list[ScheduledRequest], hidden: torch.Tensor, out: dict[int, torch.Tensor]
    ) -> None:
        offset = 0
        for item in scheduled:
            request = item.request
            start = request.num_computed_tokens
            count = min(item.num_new_tokens, request.num_prompt_tokens - start)
            if request.sampling.needs_prompt_logits and count > 0:
                out[request.request_id] = self.model.compute_logits(hidden[offset : offset + count]).float()
            offset += item.num_new_tokens

    @torch.inference_mode()
    def warm_up_context_sizes(self, sizes: tuple[int, ...], max_seq_len: int) -> None:
        """Run one context step of each of ``sizes`` tokens (CUDA only), so that kernels
        whose compiled variant depends on the step's size (the quantized GEMMs' tile
        per M bucket) compile at start-up rather than at a request's first token
        (measured: a 32-token prefix-cache remainder took 0.7 s to its first token)."""
        for num_tokens in sizes:
            self.profile_peak_memory(num_tokens, max_seq_len)

    def profile_peak_memory(self, num_tokens: int, max_seq_len: int) -> int:
        """Bytes of activation memory a ``num_tokens`` context step takes (CUDA only).

        Runs one forward pass over dummy prompts of up to ``max_seq_len`` tokens
        against a temporary KV pool just large enough, then frees it.
        """
        lengths = [max_seq_len] * (num_tokens // max_seq_len)
        if num_tokens % max_seq_len:
            lengths.append(num_tokens % max_seq_len)
        blocks_per_seq = [-(-n // self.tokens_per_block) for n in lengths]
        saved = self.kv_caches, self.num_blocks, self._num_clean_blocks
        self.allocate_kv_cache(sum(blocks_per_seq))
        tables: dict[int, list[int]] = {}
        scheduled: list[ScheduledRequest] = []
        next_block = 0
        for i, (length, num_blocks) in enumerate(zip(lengths, blocks_per_seq, strict=True)):
            tables[i] = list(range(next_block, next_block + num_blocks))
            next_block += num_blocks
            request = LlmRequest(i, [0] * length, SamplingConfig(max_tokens=1), max_seq_len)
            scheduled.append(ScheduledRequest(request, length))
        torch.cuda.synchronize(self.device)
        kv_bytes = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(scheduled, tables.__getitem__)
        wait_sends()  # a pipeline stage's activations are sent without waiting
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - kv_bytes
        self.kv_caches, self.num_blocks, self._num_clean_blocks = saved
        torch.cuda.empty_cache()
        return peak


def _mib(layers: list[KVCacheLayer]) -> float:
    return sum(t.numel() * t.element_size() for layer in layers for t in kv_cache_parts(layer)) / 2**20


def apply_token_sources(input_ids: torch.Tensor, sources: TokenSources) -> None:
    """Copy device-resident sampled tokens into ``input_ids`` (no host round trip)."""
    device = input_ids.device
    dst = to_device(sources.dst, torch.long, device)
    src = to_device(sources.src, torch.long, device)
    input_ids.index_copy_(0, dst, sources.tokens.index_select(0, src).to(input_ids.dtype))
