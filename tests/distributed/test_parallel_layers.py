"""Tensor-parallel layers take exactly their rank's slices (checked in one process by
setting the mapping; no collectives run here)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rtllm.distributed import Mapping
from rtllm.distributed import parallel_state as ps
from rtllm.layers.parallel_linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_head_range,
)
from rtllm.models.loader import LazyTensor, iter_safetensors_slices


@pytest.fixture
def rank1_of_tp2():
    ps.set_mapping(Mapping(2, 1, tp_size=2))
    yield
    ps.set_mapping(Mapping())


def test_kv_head_range():
    assert [kv_head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError):
        kv_head_range(3, 2, 0)
    with pytest.raises(ValueError):
        kv_head_range(2, 3, 0)


def test_qkv_split_with_replicated_kv_head(rank1_of_tp2):
    head_dim, hidden = 2, 4
    layer = QKVParallelLinear(hidden, head_dim, num_heads=4, num_kv_heads=1, bias=True)
    assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
    q = torch.arange(8 * hidden, dtype=torch.float32).view(8, hidden)
    k = 100 + torch.arange(2 * hidden, dtype=torch.float32).view(2, hidden)
    for shard, tensor in (("q", q), ("k", k), ("v", -k)):
        layer.weight_loader(layer.weight, tensor, shard)
        layer.weight_loader(layer.bias, tensor[:, 0], shard)
    assert torch.equal(layer.weight, torch.cat([q[4:8], k, -k]))  # q heads 2-3, the only KV head
    assert torch.equal(layer.bias, torch.cat([q[4:8, 0], k[:, 0], -k[:, 0]]))


def test_merged_column_and_row_slices(rank1_of_tp2):
    gate_up = MergedColumnParallelLinear(3, [4, 4], [0, 1])
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    gate_up.weight_loader(gate_up.weight, gate, 0)
    gate_up.weight_loader(gate_up.weight, up, 1)
    assert torch.equal(gate_up.weight, torch.cat([gate[2:], up[2:]]))
    down = RowParallelLinear(4, 3, bias=True)
    w, b = torch.randn(3, 4), torch.randn(3)
    down.weight_loader(down.weight, w)
    down.weight_loader(down.bias, b)
    assert torch.equal(down.weight, w[:, 2:]) and torch.equal(down.bias, b)


def test_vocab_shard_is_padded(rank1_of_tp2):
    embed = VocabParallelEmbedding(5, 2)  # rows 3..4 on rank 1, one padding row
    table = torch.arange(10, dtype=torch.float32).view(5, 2)
    embed.weight_loader(embed.weight, table)
    assert torch.equal(embed.weight, torch.cat([table[3:], torch.zeros(1, 2)]))


def test_lazy_slices_read_only_the_part(tmp_path, rank1_of_tp2):
    w = torch.randn(6, 4)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    [(name, lazy)] = list(iter_safetensors_slices(str(tmp_path)))
    assert name == "w" and isinstance(lazy, LazyTensor) and lazy.shape == (6, 4)
    assert torch.equal(lazy.narrow(0, 2, 3), w[2:5])
    assert torch.equal(lazy.narrow(1, 1, 2), w[:, 1:3])
    layer = RowParallelLinear(4, 6)
    layer.weight_loader(layer.weight, lazy)
    assert torch.equal(layer.weight, w[:, 2:])


def test_quantized_row_parallel_quantizes_its_columns(rank1_of_tp2):
    from rtllm.quantization import QuantAlgo, QuantConfig
    from rtllm.quantization.dispatch import quantized_linear_forward

    quant = QuantConfig(quant_algo=QuantAlgo.W8A16)
    down = RowParallelLinear(8, 3, prefix="model.layers.0.mlp.down_proj", quant_config=quant)
    w = torch.randn(3, 8)
    down.load_checkpoint_tensor("weight", w, None)
    down.process_weights_after_loading()
    x = torch.randn(5, 4)  # rank 1's input columns 4..7
    partial = quantized_linear_forward(down.quant, x)
    torch.testing.assert_close(partial, x @ w[:, 4:].T, atol=0.05, rtol=0.02)


def test_quantized_row_parallel_holds_its_bias_apart(rank1_of_tp2):
    """The bias of a quantized row-parallel layer is replicated and held by the layer
    (added once after the all-reduce), not by the quantized module whose kernels would
    add it to every rank's partial product."""
    from rtllm.quantization import QuantAlgo, QuantConfig
    from rtllm.quantization.dispatch import quantized_linear_forward

    quant = QuantConfig(quant_algo=QuantAlgo.W8A16)
    w, b = torch.randn(3, 8), torch.randn(3)
    x = torch.randn(5, 4)  # rank 1's input columns 4..7
    loaded = RowParallelLinear(8, 3, bias=True, prefix="model.layers.0.mlp.down_proj", quant_config=quant)
    loaded.load_checkpoint_tensor("weight", w, None)
    loaded.load_checkpoint_tensor("bias", b, None)
    loaded.process_weights_after_loading()
    assert loaded.quant is not None and loaded.quant.bias is None
    assert torch.equal(loaded.bias, b)  # whole, on every rank
    torch.testing.assert_close(quantized_linear_forward(loaded.quant, x), x @ w[:, 4:].T, atol=0.05, rtol=0.02)

    dummy = RowParallelLinear(8, 3, bias=True, prefix="model.layers.0.mlp.down_proj", quant_config=quant)
    dummy.init_dummy(torch.Generator().manual_seed(0))
    assert dummy.quant.bias is None and dummy.bias is not None and dummy.bias.shape == (3,)
