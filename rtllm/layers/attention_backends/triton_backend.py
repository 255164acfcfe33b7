"""Triton attention backend: the GPU fast path (also runs under Triton's CPU interpreter).

Per step, :meth:`TritonAttentionBackend.build_metadata` packs every index the kernels
need into one int32 host buffer and copies it to the device once; every layer then
reuses those tensors. Per layer, :meth:`TritonAttentionBackend.forward` writes the new
K/V into the paged cache, then runs

* the split-K decode kernel when every sequence has exactly one new token, or
* for the prompts without a cached prefix at the end of a step, attention over their
  own fresh K/V (:mod:`rtllm.kernels.prompt_attention`; 16-bit also over a quantized
  cache), with the sequences before them through the decode kernel (one new token
  each) or the paged context kernel, or
* the paged context kernel for everything else (chunked prefill, prefix hits, a
  fresh prompt followed by cached sequences).

For CUDA graphs, :class:`TritonMetadataBuffers` keeps fixed-address device buffers for a
padded decode batch and :meth:`TritonAttentionBackend.build_decode_metadata_into` fills
them: padded rows get slot ``-1`` (K/V write skipped) and ``seq_len`` 0 (output 0). The
``init_graph_buffers`` / ``graph_metadata`` / ``fill_graph_metadata`` hooks wrap this
for :class:`rtllm.runtime.cuda_graph.CudaGraphRunner`.

A :class:`QuantizedKVCache` layer is passed to the kernels as codes plus ``kv_scale``:
the write kernel quantizes, the attention kernels dequantize in registers, and the
query stays in the model dtype.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from rtllm.kernels.context_attention import context_attention
from rtllm.kernels.decode_attention import decode_attention
from rtllm.kernels.kv_cache_write import write_kv_cache
from rtllm.kernels.kv_quant import KVCacheLayer, QuantizedKVCache
from rtllm.kernels.prompt_attention import prompt_attention, prompt_token_tables
from rtllm.layers.attention_backends.base import (
    AttentionBackend,
    AttentionLayerSpec,
    StepAttentionInputs,
)


@dataclass(slots=True)
class TritonAttentionMetadata:
    """Device-side indices of one step, shared by all layers (all tensors int32)."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token; -1 = skip
    block_tables: torch.Tensor  # [batch, max_blocks] (rows padded with block 0)
    cu_seqlens_q: torch.Tensor  # [batch + 1] query row offsets
    seq_lens: torch.Tensor  # [batch] cached + new tokens
    context_lens: torch.Tensor  # [batch] cached tokens before this step
    batch_size: int
    num_tokens: int
    max_query_len: int
    # Host bound on seq_lens for the decode split heuristic. In CUDA-graph mode it is a
    # fixed bound (or None), never the step's: the split count must not change between
    # replays.
    max_seq_len: int | None
    is_decode: bool  # every sequence has exactly one new token
    # The trailing sequences [fresh_start, batch) of a step that is not decode-only are
    # prompts with no cached prefix (StepAttentionInputs.fresh_prompt_start): they
    # attend over their own K/V, 16-bit also over a quantized cache
    # (rtllm.kernels.prompt_attention, through token tables built on first use and
    # shared by the step's layers), from token fresh_first_token on, while the
    # sequences before them read the cache (the decode kernel when each has one new
    # token, else the context kernel). fresh_start is None: no such part.
    fresh_start: int | None = None
    fresh_first_token: int = 0
    fresh_cu_seqlens_q: torch.Tensor | None = None  # [batch - fresh_start + 1], from 0
    fresh_max_query_len: int = 0
    cached_is_decode: bool = True  # every sequence before fresh_start has one new token
    cached_max_query_len: int = 0
    cached_max_seq_len: int = 0
    prompt_tables: torch.Tensor | None = None


def _pinned(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int32, pin_memory=device.type == "cuda")


def _host_indices(
    inputs: StepAttentionInputs, max_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host int64 (slot_mapping, block_tables, cu_seqlens_q, seq_lens, context_lens).

    Built with a few whole-batch tensor operations: a per-sequence tensor or element
    access costs microseconds each, milliseconds per step at hundreds of sequences.
    """
    bs = inputs.tokens_per_block
    batch = len(inputs.query_lens)
    num_blocks = [len(table) for table in inputs.block_tables]
    for i, (n, q, c) in enumerate(zip(num_blocks, inputs.query_lens, inputs.context_lens, strict=True)):
        if n * bs < q + c:
            raise ValueError(f"sequence {i}: {n} blocks cannot hold {q + c} tokens")
    query_lens = torch.tensor(inputs.query_lens, dtype=torch.long)
    context_lens = torch.tensor(inputs.context_lens, dtype=torch.long)
    seq_lens = query_lens + context_lens
    tables = torch.zeros(batch, max_blocks, dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(inputs.block_tables)), dtype=torch.long)
    if flat.numel():
        blocks_per_seq = torch.tensor(num_blocks, dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(batch), blocks_per_seq)
        first = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq  # each row's first index in flat
        tables[row, torch.arange(flat.numel()) - first[row]] = flat
    cu = torch.zeros(batch + 1, dtype=torch.long)
    torch.cumsum(query_lens, 0, out=cu[1:])
    num_tokens = int(cu[-1])
    seq_of_token = torch.repeat_interleave(torch.arange(batch), query_lens)
    positions = context_lens[seq_of_token] + torch.arange(num_tokens) - cu[seq_of_token]
    slots = tables[seq_of_token, positions // bs] * bs + positions % bs
    return slots, tables, cu, seq_lens, context_lens


class TritonMetadataBuffers:
    """Fixed device buffers for decode steps of up to ``max_batch_size`` sequences.

    A CUDA graph captured on :meth:`TritonAttentionBackend.build_decode_metadata_into`'s
    output for a padded batch size ``P`` reads the same addresses at every replay:
    each field is a leading slice of one packed int32 buffer whose layout is fixed here.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_blocks_per_seq: int,
        device: torch.device,
        max_seq_len: int | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        # A fixed bound (not the step's) keeps the decode split count, and so the
        # captured kernels' grids, the same at every replay.
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = torch.device(device)
        b = max_batch_size
        # Layout: slot_mapping[b] | seq_lens[b] | context_lens[b] | cu_seqlens_q[b+1] | tables.
        self._head = 4 * b + 1
        size = self._head + b * max_blocks_per_seq
        self.packed = torch.zeros(size, dtype=torch.int32, device=self.device)
        self.host = _pinned(size, self.device)
        self.slot_mapping = self.packed[0:b]
        self.seq_lens = self.packed[b : 2 * b]
        self.context_lens = self.packed[2 * b : 3 * b]
        self.cu_seqlens_q = self.packed[3 * b : 4 * b + 1]
        self.block_tables = self.packed[self._head :].view(b, max_blocks_per_seq)
        # Set after each upload; the pinned host buffer is not rewritten before it fires.
        self.upload_done: torch.cuda.Event | None = None

    def metadata(self, padded_batch_size: int) -> TritonAttentionMetadata:
        """Decode metadata viewing the first ``padded_batch_size`` rows (fixed addresses)."""
        p = padded_batch_size
        return TritonAttentionMetadata(
            slot_mapping=self.slot_mapping[:p],
            block_tables=self.block_tables[:p],
            cu_seqlens_q=self.cu_seqlens_q[: p + 1],
            seq_lens=self.seq_lens[:p],
            context_lens=self.context_lens[:p],
            batch_size=p,
            num_tokens=p,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            is_decode=True,
        )


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through Triton kernels (decode: split-K; otherwise: paged prefill)."""

    name = "triton"

    def __init__(self) -> None:
        self.graph_buffers: TritonMetadataBuffers | None = None

    def build_metadata(self, inputs: StepAttentionInputs) -> TritonAttentionMetadata:
        device = torch.device(inputs.device)
        batch = len(inputs.query_lens)
        max_blocks = max(1, max((len(t) for t in inputs.block_tables), default=1))
        slots, tables, cu, seq_lens, context_lens = _host_indices(inputs, max_blocks)
        num_tokens = slots.shape[0]
        query_lens = inputs.query_lens
        is_decode = batch > 0 and all(q == 1 for q in query_lens)
        start = batch if is_decode else inputs.fresh_prompt_start
        fresh_cu = cu[start:] - cu[start]
        # One host buffer, one host-to-device copy; the fields are views of the result.
        sizes = [num_tokens, batch * max_blocks, batch + 1, batch, batch, fresh_cu.shape[0]]
        host = _pinned(sum(sizes), device)
        torch.cat([slots, tables.flatten(), cu, seq_lens, context_lens, fresh_cu], out=host)
        packed = host.to(device, non_blocking=True)
        slot_mapping, flat_tables, cu_d, seq_lens_d, context_lens_d, fresh_cu_d = packed.split(sizes)
        cached = query_lens[:start]
        return TritonAttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=flat_tables.view(batch, max_blocks),
            cu_seqlens_q=cu_d,
            seq_lens=seq_lens_d,
            context_lens=context_lens_d,
            batch_size=batch,
            num_tokens=num_tokens,
            max_query_len=max(inputs.query_lens, default=0),
            max_seq_len=int(seq_lens.max()) if batch else 0,
            is_decode=is_decode,
            fresh_start=start if start < batch else None,
            fresh_first_token=int(cu[start]),
            fresh_cu_seqlens_q=fresh_cu_d,
            fresh_max_query_len=max(query_lens[start:], default=0),
            cached_is_decode=all(q == 1 for q in cached),
            cached_max_query_len=max(cached, default=0),
            cached_max_seq_len=int(seq_lens[:start].max()) if start else 0,
        )

    def build_decode_metadata_into(
        self,
        inputs: StepAttentionInputs,
        buffers: TritonMetadataBuffers,
        padded_batch_size: int,
    ) -> TritonAttentionMetadata:
        """Decode metadata for ``padded_batch_size`` rows in ``buffers`` (CUDA graphs).

        The first ``len(inputs.query_lens)`` rows are the real sequences (one new token
        each); the rest are padding: slot -1, seq_len 0, block table of zeros. The
        model's inputs must be padded to ``padded_batch_size`` tokens the same way.
        """
        batch = len(inputs.query_lens)
        if any(q != 1 for q in inputs.query_lens):
            raise ValueError("build_decode_metadata_into needs one new token per sequence")
        if not batch <= padded_batch_size <= buffers.max_batch_size:
            raise ValueError(
                f"padded batch {padded_batch_size} must lie in [{batch}, {buffers.max_batch_size}]"
            )
        width = buffers.max_blocks_per_seq
        if any(len(t) > width for t in inputs.block_tables):
            raise ValueError(f"a block table is longer than the buffers' {width} blocks")
        slots, tables, _, seq_lens, context_lens = _host_indices(inputs, width)
        b, p = buffers.max_batch_size, padded_batch_size
        if buffers.upload_done is not None:
            buffers.upload_done.synchronize()  # last step's copy still reading host?
        host = buffers.host
        host[: buffers._head].zero_()
        host[0:p].fill_(-1)
        host[0:batch] = slots
        host[b : b + batch] = seq_lens
        host[2 * b : 2 * b + batch] = context_lens
        host[3 * b : 3 * b + p + 1] = torch.arange(p + 1, dtype=torch.int32)
        rows = buffers._head + p * width
        host[buffers._head : rows].zero_()
        host[buffers._head : buffers._head + batch * width] = tables.flatten()
        # Two copies: the small head, and only the first p table rows.
        buffers.packed[: buffers._head].copy_(host[: buffers._head], non_blocking=True)
        buffers.packed[buffers._head : rows].copy_(host[buffers._head : rows], non_blocking=True)
        if buffers.device.type == "cuda":
            buffers.upload_done = torch.cuda.Event()
            buffers.upload_done.record(torch.cuda.current_stream(buffers.device))
        return buffers.metadata(p)

    # CUDA-graph hooks, as rtllm.runtime.cuda_graph.CudaGraphRunner calls them: one set of
    # buffers for the largest batch; each captured size views its leading rows.
    def init_graph_buffers(
        self,
        max_batch_size: int,
        max_blocks_per_seq: int,
        max_seq_len: int | None,
        device: torch.device,
    ) -> None:
        """Allocate the fixed metadata buffers that captured decode graphs read."""
        self.graph_buffers = TritonMetadataBuffers(
            max_batch_size, max_blocks_per_seq, device, max_seq_len
        )

    def graph_metadata(self, size: int) -> TritonAttentionMetadata:
        """The metadata a graph captured for ``size`` rows is built on."""
        return self._require_graph_buffers().metadata(size)

    def fill_graph_metadata(self, size: int, inputs: StepAttentionInputs) -> None:
        """Write a decode step (``len(inputs.query_lens) <= size``) into the buffers."""
        self.build_decode_metadata_into(inputs, self._require_graph_buffers(), size)

    def _require_graph_buffers(self) -> TritonMetadataBuffers:
        if self.graph_buffers is None:
            raise RuntimeError("call init_graph_buffers() before using CUDA-graph metadata")
        return self.graph_buffers

    def forward(
        self,
        spec: AttentionLayerSpec,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCacheLayer,
        metadata: TritonAttentionMetadata,
    ) -> torch.Tensor:
        kv_scale = None
        if isinstance(kv_cache, QuantizedKVCache):
            kv_cache, kv_scale = kv_cache
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping, kv_scale)
        in_dtype = query.dtype
        if kv_scale is None and in_dtype != kv_cache.dtype:
            query = query.to(kv_cache.dtype)
        if metadata.fresh_start is not None and (kv_scale is not None or key.dtype == query.dtype):
            out = _attend_fresh_prompts_apart(spec, query, key, value, kv_cache, kv_scale, metadata)
        elif metadata.is_decode:
            out = decode_attention(
                query,
                kv_cache,
                metadata.seq_lens,
                metadata.block_tables,
                spec.scale,
                spec.sliding_window,
                max_seq_len=metadata.max_seq_len,
                kv_scale=kv_scale,
            )
        else:
            out = context_attention(
                query,
                kv_cache,
                metadata.cu_seqlens_q,
                metadata.seq_lens,
                metadata.block_tables,
                metadata.max_query_len,
                spec.scale,
                spec.sliding_window,
                kv_scale=kv_scale,
            )
        return out if out.dtype == in_dtype else out.to(in_dtype)


def _attend_fresh_prompts_apart(
    spec: AttentionLayerSpec,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_scale: torch.Tensor | None,
    metadata: TritonAttentionMetadata,
) -> torch.Tensor:
    """A step with fresh prompts: they attend over their own K/V (16-bit, also over a
    quantized cache), the sequences before them over the cache (see
    ``TritonAttentionMetadata``). For a 16-bit cache this is the same math as the
    paged context kernel, faster: whole key tiles per load instead of one block's."""
    s, t0 = metadata.fresh_start, metadata.fresh_first_token
    assert s is not None and metadata.fresh_cu_seqlens_q is not None
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if metadata.prompt_tables is None:
        metadata.prompt_tables = prompt_token_tables(metadata.fresh_cu_seqlens_q, metadata.fresh_max_query_len)
    prompt_attention(
        query[t0:], key[t0:], value[t0:], metadata.fresh_cu_seqlens_q, metadata.seq_lens[s:],
        metadata.prompt_tables, metadata.fresh_max_query_len, spec.scale, spec.sliding_window, out=out[t0:],
    )  # fmt: skip
    if s == 0:
        return out
    if metadata.cached_is_decode:
        decode_attention(
            query[:t0], kv_cache, metadata.seq_lens[:s], metadata.block_tables[:s], spec.scale,
            spec.sliding_window, max_seq_len=metadata.cached_max_seq_len, out=out[:t0], kv_scale=kv_scale,
        )  # fmt: skip
    else:
        context_attention(
            query[:t0], kv_cache, metadata.cu_seqlens_q[: s + 1], metadata.seq_lens[:s],
            metadata.block_tables[:s], metadata.cached_max_query_len, spec.scale, spec.sliding_window,
            out=out[:t0], kv_scale=kv_scale,
        )  # fmt: skip
    return out
