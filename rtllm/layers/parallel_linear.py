"""Tensor-parallel linear layers, vocabulary-parallel embedding and LM head.

The model picks these classes only when ``tp_size > 1`` (see
:mod:`rtllm.models.llama`); at ``tp_size == 1`` it keeps the plain layers of
:mod:`rtllm.layers.linear`, so single-GPU runs are untouched.

Sharding (Megatron style, one all-reduce after attention and one after the MLP):

* column-parallel (``qkv_proj``, ``gate_up_proj``): each rank holds a contiguous
  block of every fused shard's output rows; outputs stay sharded;
* row-parallel (``o_proj``, ``down_proj``): each rank holds a block of input columns;
  partial outputs are summed over the TP group, then the (replicated) bias is added once;
* vocabulary-parallel embedding / LM head: each rank holds ``ceil(vocab / tp)`` rows
  (the last rank zero-padded); embeddings are summed, logits gathered and trimmed.

Weight loaders receive the *full* checkpoint tensor or a lazy safetensors slice
(:class:`rtllm.models.loader.LazyTensor`); both have ``shape`` and
``narrow(dim, start, length)``, and the loaders only ever read the rank's part, so a
rank never materialises a whole sharded tensor. Parameters that accept lazy slices
carry ``takes_slices = True``.

Quantized layers (a ``quant_config``) stage the rank's slice of each checkpoint
tensor (:mod:`rtllm.quantization.tp_sharding`; see :mod:`rtllm.layers.linear`): float
weights are quantized per rank, so per-channel and groupwise scales are those of the
shard; pre-quantized tensors (AWQ, GPTQ, FP8, rtllm's layout) are sliced along their
packing, so a row-parallel rank's input columns must cover whole groups and words.
Calibrating algorithms (AWQ/SmoothQuant on a float checkpoint) are not sharded yet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtllm.distributed.parallel_state import get_mapping, tp_all_gather, tp_all_reduce
from rtllm.layers.linear import Linear, default_weight_loader, fused_checkpoint_names
from rtllm.quantization import dispatch
from rtllm.quantization.config import QuantConfig
from rtllm.quantization.tp_sharding import shard_quantized_tensor


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by tp_size ({parts})")
    return total // parts


def _read(loaded: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """``loaded[start:start+length]`` along ``dim`` from a tensor or a lazy slice."""
    if loaded.shape[dim] < start + length:
        raise ValueError(f"checkpoint tensor {tuple(loaded.shape)} has no rows [{start}, {start + length}) on dim {dim}")
    return loaded.narrow(dim, start, length)


def _mark_sliced(module: nn.Module) -> None:
    for param in module.parameters(recurse=False):
        param.takes_slices = True


def _stage_shard(layer: Linear, suffix: str, tensor: Any, kind: str, start: int, length: int, shard_id: object) -> None:
    """Stage the rank's slice of a quantized layer's checkpoint tensor (float weights are
    quantized per rank once staged; packed formats are sliced along their packing)."""
    in_features = layer.in_features * (get_mapping().tp_size if kind == "in" else 1)
    part = shard_quantized_tensor(layer.quant_config, layer.prefix, suffix, tensor, kind, start, length, in_features)
    if not isinstance(part, torch.Tensor):  # a replicated lazy slice: read it whole
        part = part.materialize()
    Linear.load_checkpoint_tensor(layer, suffix, part, shard_id)


class _ShardedOutputLinear(Linear):
    """Column-parallel base: shard ``s`` fills local rows ``[local_start, +size)`` from
    checkpoint rows ``[ckpt_start, +size)`` of that shard's tensor.

    ``shard_names`` are the checkpoint modules of fused shards (for ``exclude_modules``).
    """

    stages_slices = True  # load_checkpoint_tensor reads its part of a lazy slice

    def __init__(
        self,
        in_features: int,
        plan: dict[object, tuple[int, int, int]],
        bias: bool,
        prefix: str,
        quant_config: QuantConfig | None = None,
        shard_names: list[str] | None = None,
    ) -> None:
        self._plan = plan
        self._shard_names = shard_names
        out_features = sum(size for _, size, _ in plan.values())
        super().__init__(in_features, out_features, bias, quant_config, prefix)
        _mark_sliced(self)

    def shard_ids(self) -> list[object]:
        return list(self._plan)

    def checkpoint_names(self) -> list[str]:
        return fused_checkpoint_names(self.prefix, self._shard_names)

    def load_checkpoint_tensor(self, suffix: str, tensor: Any, shard_id: object) -> None:
        if shard_id not in self._plan:
            raise ValueError(f"{self.prefix}: unknown shard {shard_id!r}; expected {list(self._plan)}")
        _, size, ckpt_start = self._plan[shard_id]
        _stage_shard(self, suffix, tensor, "out", ckpt_start, size, shard_id)

    def shard_rows(self, shard_id: object) -> tuple[int, int]:
        local_start, size, _ = self._plan[shard_id]
        return local_start, size

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: object = None) -> None:
        if shard_id not in self._plan:
            raise ValueError(f"{self.prefix}: unknown shard {shard_id!r}; expected {list(self._plan)}")
        local_start, size, ckpt_start = self._plan[shard_id]
        part = _read(loaded, 0, ckpt_start, size)
        default_weight_loader(param.data.narrow(0, local_start, size), part.to(param.dtype))


class ColumnParallelLinear(_ShardedOutputLinear):
    """``y_r = x W_r^T``: rank ``r`` computes its block of the output features."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        prefix: str = "",
        quant_config: QuantConfig | None = None,
    ) -> None:
        m = get_mapping()
        size = _divide(out_features, m.tp_size, f"{prefix} out_features")
        super().__init__(in_features, {None: (0, size, m.tp_rank * size)}, bias, prefix, quant_config)


class MergedColumnParallelLinear(_ShardedOutputLinear):
    """Several column-parallel layers sharing an input (``gate_up_proj``): each rank holds
    its block of every shard, shards kept in order."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        shard_ids: list[object],
        bias: bool = False,
        prefix: str = "",
        quant_config: QuantConfig | None = None,
        shard_names: list[str] | None = None,
    ) -> None:
        if len(output_sizes) != len(shard_ids):
            raise ValueError("output_sizes and shard_ids must have the same length")
        m = get_mapping()
        plan: dict[object, tuple[int, int, int]] = {}
        start = 0
        for shard_id, total in zip(shard_ids, output_sizes, strict=True):
            size = _divide(total, m.tp_size, f"{prefix} output size of shard {shard_id!r}")
            plan[shard_id] = (start, size, m.tp_rank * size)
            start += size
        super().__init__(in_features, plan, bias, prefix, quant_config, shard_names)


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``(first, count)`` of the KV heads a tensor rank holds.

    With ``num_kv_heads >= tp_size`` the heads are split evenly; with fewer KV heads
    than ranks each head is replicated on ``tp_size // num_kv_heads`` adjacent ranks,
    which are exactly the ranks whose query heads read it.
    """
    if num_kv_heads >= tp_size:
        count = _divide(num_kv_heads, tp_size, "num_key_value_heads")
        return tp_rank * count, count
    if tp_size % num_kv_heads:
        raise ValueError(
            f"tp_size ({tp_size}) must be a multiple of num_key_value_heads ({num_kv_heads}) "
            "when there are fewer KV heads than ranks"
        )
    return tp_rank // (tp_size // num_kv_heads), 1


class QKVParallelLinear(_ShardedOutputLinear):
    """Fused q/k/v of grouped-query attention split by heads: rank ``r`` holds query
    heads ``[r * H/tp, (r+1) * H/tp)`` and the KV heads those queries use
    (:func:`kv_head_range`). ``num_heads``/``num_kv_heads``/``q_size``/``kv_size`` are
    the rank's local values."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        prefix: str = "",
        quant_config: QuantConfig | None = None,
    ) -> None:
        m = get_mapping()
        self.num_heads = _divide(num_heads, m.tp_size, f"{prefix} num_attention_heads")
        kv_first, self.num_kv_heads = kv_head_range(num_kv_heads, m.tp_size, m.tp_rank)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        plan = {
            "q": (0, self.q_size, m.tp_rank * self.q_size),
            "k": (self.q_size, self.kv_size, kv_first * head_dim),
            "v": (self.q_size + self.kv_size, self.kv_size, kv_first * head_dim),
        }
        super().__init__(hidden_size, plan, bias, prefix, quant_config, ["q_proj", "k_proj", "v_proj"])


class RowParallelLinear(Linear):
    """``y = sum_r x_r W_r^T + b``: rank ``r`` holds a block of the input features and its
    partial products are all-reduced over the TP group; the bias is added after the
    reduction (once, not ``tp_size`` times). A quantized layer's bias is replicated on
    every rank and held by this layer, not by its quantized module, for that reason."""

    stages_slices = True  # load_checkpoint_tensor reads its part of a lazy slice

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        prefix: str = "",
        quant_config: QuantConfig | None = None,
    ) -> None:
        m = get_mapping()
        self.tp_rank = m.tp_rank
        local = _divide(in_features, m.tp_size, f"{prefix} in_features")
        super().__init__(local, out_features, bias, quant_config, prefix)
        _mark_sliced(self)

    def process_weights_after_loading(self) -> None:
        super().process_weights_after_loading()
        self._hold_quantized_bias()

    def quantize_float_weight(
        self, pre_quant_scale: torch.Tensor | None = None, input_amax: float | None = None
    ) -> None:
        super().quantize_float_weight(pre_quant_scale, input_amax)
        self._hold_quantized_bias()

    def init_dummy(self, generator: torch.Generator) -> None:
        super().init_dummy(generator)
        self._hold_quantized_bias()

    def _hold_quantized_bias(self) -> None:
        """Move the quantized module's bias here: its kernels would add it to each rank's
        partial product, ``tp_size`` times in the all-reduced sum."""
        quant = self.quant
        if quant is not None and getattr(quant, "bias", None) is not None:
            self.bias = nn.Parameter(quant.bias.data, requires_grad=False)
            quant.register_parameter("bias", None)

    def load_checkpoint_tensor(self, suffix: str, tensor: Any, shard_id: object) -> None:
        local = self.in_features
        _stage_shard(self, suffix, tensor, "in", self.tp_rank * local, local, shard_id)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: object = None) -> None:
        if param is self.bias:  # replicated
            default_weight_loader(param, _read(loaded, 0, 0, loaded.shape[0]).to(param.dtype))
            return
        local = self.in_features
        default_weight_loader(param, _read(loaded, 1, self.tp_rank * local, local).to(param.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            partial = dispatch.quantized_linear_forward(self.quant, x)
        elif self.weight is None:
            raise RuntimeError(f"{self.prefix}: quantized layer used before its weights were loaded")
        else:
            partial = F.linear(x, self.weight)
        out = tp_all_reduce(partial)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows are split over the TP ranks; each rank looks up the ids in its
    range, zeros the others, and the results are summed over the group."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        m = get_mapping()
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // m.tp_size)
        self.vocab_start = min(num_embeddings, m.tp_rank * self.rows_per_rank)
        self.vocab_end = min(num_embeddings, self.vocab_start + self.rows_per_rank)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.takes_slices = True

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: object = None) -> None:
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"vocabulary of {loaded.shape[0]} rows, expected {self.num_embeddings}")
        count = self.vocab_end - self.vocab_start
        param.data.zero_()  # the padding rows of the last rank
        default_weight_loader(param.data[:count], _read(loaded, 0, self.vocab_start, count).to(param.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inside = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(inside, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """LM head over a vocabulary split like :class:`VocabParallelEmbedding` (so a tied
    head can share the embedding's parameter): local logits are gathered over the TP
    group and the padding columns dropped; every rank gets the full logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tp_all_gather(F.linear(hidden, self.weight), dim=-1)
        return logits[..., : self.num_embeddings]
