"""Linear layers whose parameters know how checkpoint tensors load into them.

Each parameter carries a ``weight_loader(param, tensor, shard_id)``: fused layers
(q/k/v, gate/up) declare where each checkpoint shard goes, so the model loader
fuses them without knowing any model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy ``loaded`` into ``param`` after checking the shape."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """``y = x W^T + b`` with Hugging Face's ``weight``/``bias`` names."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several linear layers sharing an input, fused along the output dimension.

    ``output_sizes[i]`` rows of the fused weight belong to shard ``shard_ids[i]``.
    """

    def __init__(
        self, in_features: int, output_sizes: list[int], shard_ids: list[object], bias: bool = False
    ) -> None:
        if len(output_sizes) != len(shard_ids):
            raise ValueError("output_sizes and shard_ids must have the same length")
        super().__init__(in_features, sum(output_sizes), bias)
        self._offsets: dict[object, tuple[int, int]] = {}
        start = 0
        for shard_id, size in zip(shard_ids, output_sizes, strict=True):
            self._offsets[shard_id] = (start, size)
            start += size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id not in self._offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self._offsets)}")
        start, size = self._offsets[shard_id]
        default_weight_loader(param.data.narrow(0, start, size), loaded)


class QKVLinear(MergedLinear):
    """The fused q/k/v projection of grouped-query attention (shards "q", "k", "v")."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], ["q", "k", "v"], bias)
