"""CUDA graphs for generation steps.

At start-up one graph is captured per batch size in ``CudaGraphConfig.batch_sizes``
(largest first, sharing one memory pool); a generation-only step of ``n``
sequences replays the smallest captured graph of at least ``n`` rows, with the
rows past ``n`` padded (their KV writes skipped, their logits ignored). Context
steps run eagerly.

Static inputs: ``input_ids``/``positions`` buffers here and the attention
backend's graph metadata buffers (see ``AttentionBackend.graph_metadata``).
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from rtllm.layers.attention_backends import StepAttentionInputs
from rtllm.runtime.forward_context import ForwardContext, forward_context

logger = logging.getLogger(__name__)


def default_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond."""
    sizes = [1, 2, 4]
    size = 8
    while size <= max_batch_size:
        sizes.append(size)
        size += 8 if size < 64 else 16 if size < 256 else 32
    return [s for s in sizes if s <= max_batch_size] or [1]


class CudaGraphRunner:
    """Captures and replays generation steps of a :class:`ModelRunner`."""

    def __init__(self, runner, batch_sizes: list[int], max_seq_len: int, enable_padding: bool = True) -> None:  # noqa: ANN001
        self.runner = runner
        self.enable_padding = enable_padding
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.batch_sizes[-1]
        self.max_seq_len = max_seq_len
        device = runner.device
        self.input_ids = torch.zeros(self.max_batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_batch_size, dtype=torch.long, device=device)
        # One logits buffer shared by every graph: per-graph outputs would each keep
        # [batch, vocab] float32 alive (over a GiB for large vocabularies).
        vocab = runner.config.vocab_size
        self.logits = torch.empty(self.max_batch_size, vocab, dtype=torch.float32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._metadata: dict[int, object] = {}
        self.memory_bytes = 0

    def can_run(self, num_sequences: int) -> bool:
        if not self.enable_padding:
            return num_sequences in self._graphs
        return num_sequences <= self.max_batch_size

    @torch.inference_mode()
    def capture(self) -> None:
        runner = self.runner
        backend = runner.backend
        max_blocks = -(-self.max_seq_len // runner.tokens_per_block)
        backend.init_graph_buffers(self.max_batch_size, max_blocks, self.max_seq_len, runner.device)
        start = time.perf_counter()
        before = torch.cuda.memory_allocated(runner.device)
        pool = None
        for size in reversed(self.batch_sizes):
            metadata = backend.graph_metadata(size)
            backend.fill_graph_metadata(size, _padding_only(runner.tokens_per_block, runner.device))
            ids, pos = self.input_ids[:size], self.positions[:size]
            context = ForwardContext(backend, metadata, runner.kv_caches)
            with forward_context(context):  # warm-up outside the graph (Triton compiles here)
                runner.model.compute_logits(runner.model(ids, pos))
            torch.cuda.synchronize(runner.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call from another thread (a server's event loop, a
            # finalizer) must not invalidate this capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), forward_context(context):
                self.logits[:size].copy_(runner.model.compute_logits(runner.model(ids, pos)))
            pool = graph.pool()
            self._graphs[size], self._metadata[size] = graph, metadata
        torch.cuda.synchronize(runner.device)
        self.memory_bytes = torch.cuda.memory_allocated(runner.device) - before
        logger.info(
            "captured %d CUDA graphs (batch sizes %s) in %.1f s, %.1f MiB",
            len(self._graphs),
            self.batch_sizes,
            time.perf_counter() - start,
            self.memory_bytes / 2**20,
        )

    def run(self, step, token_sources, input_ids: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ANN001
        """Replay the graph for a generation-only ``step``; returns float32 logits.

        ``input_ids``, a device tensor, replaces ``step.input_ids`` (a parallel
        follower receives its ids on the device)."""
        from rtllm.runtime.model_runner import apply_token_sources
        from rtllm.runtime.transfer import to_device

        num = len(step.input_ids)
        size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, num)]
        device = self.runner.device
        ids = to_device(step.input_ids, torch.long, device) if input_ids is None else input_ids
        self.input_ids[:num].copy_(ids, non_blocking=True)
        self.positions[:num].copy_(to_device(step.positions, torch.long, device), non_blocking=True)
        if size > num:
            self.input_ids[num:size].zero_()
            self.positions[num:size].zero_()
        if token_sources is not None:
            apply_token_sources(self.input_ids[:num], token_sources)
        self.runner.backend.fill_graph_metadata(size, step.attention)
        self._graphs[size].replay()
        return self.logits[:num]


def _padding_only(tokens_per_block: int, device: torch.device) -> StepAttentionInputs:
    """A step with no real sequence: every graph row is padding."""
    return StepAttentionInputs([], [], [], tokens_per_block, device)
