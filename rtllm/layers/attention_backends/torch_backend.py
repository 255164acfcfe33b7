"""Reference attention backend in plain PyTorch (any device; the CPU default).

Each step it gathers every sequence's KV *blocks* through its block table into a
padded ``[batch, kv_heads, max_blocks * tokens_per_block, head_dim]`` view (whole
blocks are copied, which is far cheaper than gathering token by token) and runs
one ``scaled_dot_product_attention`` with a causal + padding mask. Grouped-query
heads are folded into the query-row dimension, so KV is never repeated.

A quantized cache (:class:`QuantizedKVCache`, int8 or float8_e4m3fn) is emulated with
the reference arithmetic of :mod:`rtllm.kernels.kv_quant`: new rows are quantized with
a fresh per-(token, head) scale on write, and the gathered blocks are dequantized to
the query's dtype before SDPA. FP8 codes move as ``uint8`` views (CPU PyTorch has no
float8 ``index_copy_`` / ``index_select``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rtllm.kernels.kv_quant import (
    KVCacheLayer,
    QuantizedKVCache,
    dequantize_kv,
    raw_view,
    store_quantized_rows,
    value_codes_by_head,
)
from rtllm.layers.attention_backends.base import (
    AttentionBackend,
    AttentionLayerSpec,
    StepAttentionInputs,
)


@dataclass(slots=True)
class TorchAttentionMetadata:
    """Gather/scatter indices and masks of one step (shared by all layers)."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    block_ids: torch.Tensor  # [batch * max_blocks] block table rows, padded with block 0
    query_flat_index: torch.Tensor | None  # [num_tokens] row in [batch * max_query_len]; None if no padding
    query_positions: torch.Tensor  # [batch, max_query_len] absolute position of each query row
    key_valid: torch.Tensor  # [batch, max_blocks * tokens_per_block]
    batch_size: int
    max_query_len: int
    _masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

    def mask(self, group_size: int, sliding_window: int | None) -> torch.Tensor:
        """Boolean mask ``[batch, 1, max_query_len * group_size, keys]`` (True = attend)."""
        key = (group_size, sliding_window)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        num_keys = self.key_valid.shape[1]
        key_positions = torch.arange(num_keys, device=self.key_valid.device)
        qpos = self.query_positions[:, :, None]
        allowed = (key_positions[None, None, :] <= qpos) & self.key_valid[:, None, :]
        if sliding_window is not None:
            allowed &= key_positions[None, None, :] > qpos - sliding_window
        # Padded query rows have position 0 and so see key 0: no row is all-masked (no NaN).
        mask = allowed[:, :, None, :].expand(-1, -1, group_size, -1)
        mask = mask.reshape(self.batch_size, 1, self.max_query_len * group_size, num_keys)
        self._masks[key] = mask
        return mask


class TorchAttentionBackend(AttentionBackend):
    """Paged attention by block gather + SDPA; correct everywhere, fast enough on CPU."""

    name = "torch"

    def build_metadata(self, inputs: StepAttentionInputs) -> TorchAttentionMetadata:
        device = inputs.device
        bs = inputs.tokens_per_block
        batch = len(inputs.query_lens)
        query_lens = torch.tensor(inputs.query_lens, dtype=torch.long)
        context_lens = torch.tensor(inputs.context_lens, dtype=torch.long)
        seq_lens = query_lens + context_lens
        max_query_len = max(inputs.query_lens)
        max_blocks = max(len(t) for t in inputs.block_tables)
        block_tables = torch.zeros(batch, max_blocks, dtype=torch.long)
        for i, table in enumerate(inputs.block_tables):
            block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)

        key_positions = torch.arange(max_blocks * bs)
        key_valid = key_positions[None, :] < seq_lens[:, None]
        query_offsets = torch.arange(max_query_len)
        query_valid = query_offsets[None, :] < query_lens[:, None]
        query_positions = torch.where(query_valid, context_lens[:, None] + query_offsets, 0)
        positions = query_positions[query_valid]
        owner = torch.arange(batch)[:, None].expand(batch, max_query_len)[query_valid]
        slot_mapping = block_tables[owner, positions // bs] * bs + positions % bs
        # When every sequence has the same query length the packed tokens already
        # form the padded [batch, max_query_len] layout: no scatter/gather needed.
        uniform = min(inputs.query_lens) == max_query_len
        query_flat_index = None
        if not uniform:
            query_flat_index = torch.arange(batch * max_query_len).view(batch, max_query_len)[query_valid]
            query_flat_index = query_flat_index.to(device)
        return TorchAttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            block_ids=block_tables.view(-1).to(device),
            query_flat_index=query_flat_index,
            query_positions=query_positions.to(device),
            key_valid=key_valid.to(device),
            batch_size=batch,
            max_query_len=max_query_len,
        )

    def forward(
        self,
        spec: AttentionLayerSpec,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCacheLayer,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        num_kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
        group = spec.num_heads // num_kv_heads
        if isinstance(kv_cache, QuantizedKVCache):
            kv = _store_and_gather_quantized(kv_cache, key, value, metadata, query.dtype)
        else:
            num_blocks, bs = kv_cache.shape[1], kv_cache.shape[2]
            flat = kv_cache.view(2, num_blocks * bs, num_kv_heads, head_dim)
            flat[0].index_copy_(0, metadata.slot_mapping, key.to(kv_cache.dtype))
            flat[1].index_copy_(0, metadata.slot_mapping, value.to(kv_cache.dtype))
            kv = kv_cache.index_select(1, metadata.block_ids).to(query.dtype)

        batch, max_q = metadata.batch_size, metadata.max_query_len
        # [2, B * max_blocks, bs, Hkv, D] -> K and V of [B, Hkv, max_blocks * bs, D]
        kv = kv.view(2, batch, -1, num_kv_heads, head_dim).transpose(2, 3)
        if metadata.query_flat_index is None:
            padded = query.view(batch, max_q, spec.num_heads, head_dim)
        else:
            padded = query.new_zeros(batch * max_q, spec.num_heads, head_dim)
            padded.index_copy_(0, metadata.query_flat_index, query)
            padded = padded.view(batch, max_q, spec.num_heads, head_dim)
        # [B, Q, Hkv, G, D] -> [B, Hkv, Q*G, D]: query heads of one KV head become extra rows.
        rows = padded.view(batch, max_q, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
        rows = rows.reshape(batch, num_kv_heads, max_q * group, head_dim)
        out = F.scaled_dot_product_attention(
            rows, kv[0], kv[1], attn_mask=metadata.mask(group, spec.sliding_window), scale=spec.scale
        )
        out = out.view(batch, num_kv_heads, max_q, group, head_dim).permute(0, 2, 1, 3, 4)
        out = out.reshape(batch * max_q, spec.num_heads, head_dim)
        if metadata.query_flat_index is None:
            return out
        return out.index_select(0, metadata.query_flat_index)


def _store_and_gather_quantized(
    cache: QuantizedKVCache,
    key: torch.Tensor,
    value: torch.Tensor,
    metadata: TorchAttentionMetadata,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Quantize this step's rows into ``cache``; return the step's blocks dequantized to
    ``dtype``, ``[2, B * max_blocks, tokens_per_block, Hkv, D]``."""
    data, scale = cache
    store_quantized_rows(data, scale, key, value, metadata.slot_mapping.long())
    # V codes are stored transposed per block, [Hkv, D, tokens] (kv_quant).
    blocks = metadata.block_ids
    codes = torch.stack(
        (
            raw_view(data)[0].index_select(0, blocks),
            value_codes_by_head(data).index_select(0, blocks).permute(0, 3, 1, 2),
        )
    ).view(data.dtype)
    return dequantize_kv(codes, scale.index_select(1, blocks), dtype)
