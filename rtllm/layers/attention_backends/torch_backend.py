"""Reference attention backend in plain PyTorch (any device; the CPU default).

Each step it gathers every sequence's KV through its block table into a padded
``[batch, kv_heads, max_seq_len, head_dim]`` view and runs one
``scaled_dot_product_attention`` with a causal + padding mask. Grouped-query
heads are folded into the query-row dimension, so KV is never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rtllm.layers.attention_backends.base import (
    AttentionBackend,
    AttentionLayerSpec,
    StepAttentionInputs,
)


@dataclass(slots=True)
class TorchAttentionMetadata:
    """Gather/scatter indices and masks of one step (shared by all layers)."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    kv_slots: torch.Tensor  # [batch, max_seq_len] cache slot of each key position
    query_flat_index: torch.Tensor  # [num_tokens] row of each token in [batch * max_query_len]
    query_positions: torch.Tensor  # [batch, max_query_len] absolute position of each query row
    key_valid: torch.Tensor  # [batch, max_seq_len]
    batch_size: int
    max_query_len: int
    _masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

    def mask(self, group_size: int, sliding_window: int | None) -> torch.Tensor:
        """Boolean mask ``[batch, 1, max_query_len * group_size, max_seq_len]`` (True = attend)."""
        key = (group_size, sliding_window)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        max_seq_len = self.kv_slots.shape[1]
        key_positions = torch.arange(max_seq_len, device=self.kv_slots.device)
        qpos = self.query_positions[:, :, None]
        allowed = (key_positions[None, None, :] <= qpos) & self.key_valid[:, None, :]
        if sliding_window is not None:
            allowed &= key_positions[None, None, :] > qpos - sliding_window
        # Padded query rows have position 0 and so see key 0: no row is all-masked (no NaN).
        mask = allowed[:, :, None, :].expand(-1, -1, group_size, -1)
        mask = mask.reshape(self.batch_size, 1, self.max_query_len * group_size, max_seq_len)
        self._masks[key] = mask
        return mask


class TorchAttentionBackend(AttentionBackend):
    """Paged attention by gather + SDPA; correct everywhere, fast enough on CPU."""

    name = "torch"

    def build_metadata(self, inputs: StepAttentionInputs) -> TorchAttentionMetadata:
        device = inputs.device
        bs = inputs.tokens_per_block
        batch = len(inputs.query_lens)
        query_lens = torch.tensor(inputs.query_lens, dtype=torch.long)
        context_lens = torch.tensor(inputs.context_lens, dtype=torch.long)
        seq_lens = query_lens + context_lens
        max_query_len = int(query_lens.max())
        max_seq_len = int(seq_lens.max())
        max_blocks = max(len(t) for t in inputs.block_tables)
        block_tables = torch.zeros(batch, max_blocks, dtype=torch.long)
        for i, table in enumerate(inputs.block_tables):
            block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)

        key_positions = torch.arange(max_seq_len)
        block_index = (key_positions // bs).clamp(max=max_blocks - 1)
        kv_slots = block_tables[:, block_index] * bs + key_positions % bs
        key_valid = key_positions[None, :] < seq_lens[:, None]
        kv_slots = torch.where(key_valid, kv_slots, 0)

        query_offsets = torch.arange(max_query_len)
        query_valid = query_offsets[None, :] < query_lens[:, None]
        query_positions = torch.where(query_valid, context_lens[:, None] + query_offsets, 0)
        slot_mapping = kv_slots.gather(1, query_positions)[query_valid]
        flat_rows = torch.arange(batch * max_query_len).view(batch, max_query_len)
        query_flat_index = flat_rows[query_valid]
        return TorchAttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            kv_slots=kv_slots.to(device),
            query_flat_index=query_flat_index.to(device),
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
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        num_kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
        group = spec.num_heads // num_kv_heads
        k_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)
        v_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
        k_cache.index_copy_(0, metadata.slot_mapping, key.to(k_cache.dtype))
        v_cache.index_copy_(0, metadata.slot_mapping, value.to(v_cache.dtype))

        batch, max_q = metadata.batch_size, metadata.max_query_len
        keys = k_cache[metadata.kv_slots].permute(0, 2, 1, 3).to(query.dtype)
        values = v_cache[metadata.kv_slots].permute(0, 2, 1, 3).to(query.dtype)
        if batch == 1 and max_q == query.shape[0]:
            padded = query.unsqueeze(0)
        else:
            padded = query.new_zeros(batch * max_q, spec.num_heads, head_dim)
            padded[metadata.query_flat_index] = query
            padded = padded.view(batch, max_q, spec.num_heads, head_dim)
        # [B, Q, Hkv, G, D] -> [B, Hkv, Q*G, D]: query heads of one KV head become extra rows.
        rows = padded.view(batch, max_q, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
        rows = rows.reshape(batch, num_kv_heads, max_q * group, head_dim)
        out = F.scaled_dot_product_attention(
            rows, keys, values, attn_mask=metadata.mask(group, spec.sliding_window), scale=spec.scale
        )
        out = out.view(batch, num_kv_heads, max_q, group, head_dim).permute(0, 2, 1, 3, 4)
        out = out.reshape(batch * max_q, spec.num_heads, head_dim)
        if batch == 1 and max_q == query.shape[0]:
            return out
        return out[metadata.query_flat_index]
