"""A tensor-parallel rank's slice of packed AWQ/GPTQ tensors unpacks to exactly the
rows or columns of the whole layer that the rank holds."""

from __future__ import annotations

import pytest
import torch

from rtllm.quantization import QuantAlgo, QuantConfig
from rtllm.quantization.packing import pack_awq, pack_gptq, unpack_awq, unpack_gptq
from rtllm.quantization.rtn import quantize_groupwise_asymmetric
from rtllm.quantization.tp_sharding import shard_quantized_tensor

OUT, IN, GROUP = 32, 128, 32


def _codes():
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    return quantize_groupwise_asymmetric(w, GROUP, 4)  # q [out, in], scale/zero [out, in/g]


def _packed(fmt: str):
    q, scale, zero = _codes()
    if fmt == "awq":
        t = pack_awq(q, zero, scale)
        return QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ, group_size=64), {
            "qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales}
    t = pack_gptq(q, zero, scale, 4)
    return QuantConfig(quant_algo=QuantAlgo.W4A16_GPTQ, group_size=GROUP), {
        "qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales, "g_idx": t.g_idx}


def _unpack(fmt: str, tensors):
    if fmt == "awq":
        return unpack_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"])
    return unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], 4)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize(("kind", "start", "length"), [("out", 16, 16), ("out", 8, 8), ("in", 64, 64), ("in", 32, 32)])
def test_slices_unpack_to_the_ranks_part(fmt, kind, start, length):
    config, tensors = _packed(fmt)
    whole = _unpack(fmt, tensors)
    parts = {s: shard_quantized_tensor(config, "layer", s, t, kind, start, length, IN) for s, t in tensors.items()}
    got = _unpack(fmt, parts)
    if kind == "out":
        expected = [whole.q[start:start + length], whole.zeros[start:start + length], whole.scales[start:start + length]]
    else:
        groups = slice(start // GROUP, (start + length) // GROUP)
        expected = [whole.q[:, start:start + length], whole.zeros[:, groups], whole.scales[:, groups]]
    for field, want in zip(got, expected, strict=True):
        assert torch.equal(field, want)


def test_a_range_that_splits_a_group_or_word_is_refused():
    config, tensors = _packed("gptq")
    with pytest.raises(ValueError, match="whole units"):
        shard_quantized_tensor(config, "layer", "scales", tensors["scales"], "in", 16, 16, IN)  # half a group
    config, tensors = _packed("awq")
    with pytest.raises(ValueError, match="whole units"):
        shard_quantized_tensor(config, "layer", "qweight", tensors["qweight"], "out", 4, 4, IN)  # half a word


def test_per_tensor_and_per_channel_scales_are_replicated_where_they_do_not_vary():
    config = QuantConfig(quant_algo=QuantAlgo.W8A16)
    scalar = torch.tensor(0.5)
    assert shard_quantized_tensor(config, "l", "weight_scale", scalar, "out", 0, 4, 8) is scalar
    per_channel = torch.rand(8, 1)
    assert shard_quantized_tensor(config, "l", "weight_scale", per_channel, "in", 4, 4, 8) is per_channel
    assert torch.equal(shard_quantized_tensor(config, "l", "weight_scale", per_channel, "out", 4, 4, 8), per_channel[4:])
