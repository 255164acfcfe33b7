"""int32 word packing and the AWQ / GPTQ layouts: hand-computed words and round trips."""

from __future__ import annotations

import pytest
import torch

from rtllm.quantization.packing import (
    AWQ_ORDER,
    pack_awq,
    pack_gptq,
    pack_int32,
    unpack_awq,
    unpack_gptq,
    unpack_int32,
)
from rtllm.quantization.rtn import dequantize, quantize_groupwise_asymmetric


def _int32(word: int) -> int:
    """The int32 two's-complement value of an unsigned 32-bit word."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sequential_nibbles_hand_computed() -> None:
    values = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])
    packed = pack_int32(values, 4, dim=1)
    assert packed.dtype == torch.int32 and packed.shape == (2, 1)
    assert packed[:, 0].tolist() == [0x76543210, _int32(0xFEDCBA98)]
    assert torch.equal(unpack_int32(packed, 4, dim=1), values.to(torch.int32))


def test_awq_order_hand_computed() -> None:
    values = torch.arange(8).view(1, 8)
    # Field i holds element AWQ_ORDER[i]: fields 0..7 = 0,2,4,6,1,3,5,7.
    assert pack_int32(values, 4, dim=1, order=AWQ_ORDER).item() == 0x75316420


def test_8_bit_fields_hand_computed() -> None:
    values = torch.tensor([[1], [2], [3], [0xFF]])
    packed = pack_int32(values, 8, dim=0)
    assert packed.shape == (1, 1) and packed.item() == _int32(0xFF030201)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pack_unpack_round_trip(bits: int, dim: int) -> None:
    g = _gen(bits)
    n = 32 // bits
    shape = [n, 2 * n, 3 * n]
    values = torch.randint(0, 1 << bits, shape, generator=g)
    order = torch.randperm(n, generator=g).tolist()
    packed = pack_int32(values, bits, dim=dim, order=order)
    expected_shape = list(shape)
    expected_shape[dim] //= n
    assert list(packed.shape) == expected_shape
    assert torch.equal(unpack_int32(packed, bits, dim=dim, order=order), values.to(torch.int32))


@pytest.mark.parametrize(
    ("values", "kwargs", "match"),
    [
        (torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), {}, "values must be in"),
        (torch.tensor([[-1, 0, 0, 0, 0, 0, 0, 0]]), {}, "values must be in"),
        (torch.zeros(1, 6, dtype=torch.int64), {}, "multiple of 8"),
        (torch.zeros(1, 8, dtype=torch.int64), {"order": [0, 1, 2]}, "permutation"),
    ],
)
def test_pack_rejects(values: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_int32(values, 4, dim=1, **kwargs)


def test_awq_layout_hand_computed() -> None:
    # out = 8, in = 2, one group. Internal q[o, i]: input row 0 holds codes 0..7 across the
    # outputs, row 1 holds 15..8.
    q = torch.stack([torch.arange(8), 15 - torch.arange(8)], dim=1).to(torch.uint8)
    zeros = torch.arange(1, 9, dtype=torch.int32).view(8, 1)
    scales = torch.full((8, 1), 0.5)
    awq = pack_awq(q, zeros, scales)
    assert awq.qweight.shape == (2, 1) and awq.qzeros.shape == (1, 1)
    # Row 1, fields in AWQ order: elements 15,13,11,9,14,12,10,8 -> 0x8ACE9BDF.
    assert awq.qweight[:, 0].tolist() == [0x75316420, _int32(0x8ACE9BDF)]
    # Zeros 1..8 in AWQ order: fields 1,3,5,7,2,4,6,8 -> 0x86427531.
    assert awq.qzeros.item() == _int32(0x86427531)
    assert awq.scales.dtype == torch.float16 and awq.scales.shape == (1, 8)
    back = unpack_awq(*awq)
    assert torch.equal(back.q, q) and torch.equal(back.zeros, zeros)
    assert torch.equal(back.scales, scales.half())


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_round_trip_random(group_size: int) -> None:
    g = _gen(1)
    out_features, in_features = 24, 256
    num_groups = in_features // group_size
    q = torch.randint(0, 16, (out_features, in_features), generator=g).to(torch.uint8)
    zeros = torch.randint(0, 16, (out_features, num_groups), generator=g).to(torch.int32)
    scales = torch.rand(out_features, num_groups, generator=g).half()
    awq = pack_awq(q, zeros, scales)
    assert awq.qweight.shape == (in_features, out_features // 8)
    assert awq.qzeros.shape == (num_groups, out_features // 8)
    assert awq.scales.shape == (num_groups, out_features)
    back = unpack_awq(*awq)
    assert back.q.dtype == torch.uint8 and back.zeros.dtype == torch.int32
    assert torch.equal(back.q, q) and torch.equal(back.zeros, zeros)
    assert torch.equal(back.scales, scales)


def test_awq_rejects_mismatched_shapes() -> None:
    awq = pack_awq(
        torch.zeros(8, 64, dtype=torch.uint8),
        torch.zeros(8, 1, dtype=torch.int32),
        torch.ones(8, 1),
    )
    with pytest.raises(ValueError, match="AWQ shapes"):
        unpack_awq(awq.qweight, awq.qzeros, torch.ones(1, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="must both be"):
        pack_awq(
            torch.zeros(8, 64, dtype=torch.uint8),
            torch.zeros(8, 2, dtype=torch.int32),
            torch.ones(8, 1),
        )


def test_gptq_layout_hand_computed_4_bit() -> None:
    # out = 8, in = 8, one group; q[o, i] = (i + o) % 16, so output column o packs the
    # input rows' codes o, o+1, ..., o+7 (sequential, row 0 in the low nibble).
    q = ((torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 16).to(torch.uint8)
    zeros = torch.arange(1, 9, dtype=torch.int32).view(8, 1)
    gptq = pack_gptq(q, zeros, torch.ones(8, 1), bits=4)
    assert gptq.qweight.shape == (1, 8) and gptq.qzeros.shape == (1, 1)
    assert gptq.qweight[0, 0].item() == 0x76543210
    assert gptq.qweight[0, 1].item() == _int32(0x87654321)
    assert gptq.qweight[0, 7].item() == _int32(0xEDCBA987)
    # Stored zeros are zero - 1 = 0..7.
    assert gptq.qzeros.item() == 0x76543210
    assert gptq.g_idx.tolist() == [0] * 8
    back = unpack_gptq(*gptq, bits=4)
    assert torch.equal(back.q, q) and torch.equal(back.zeros, zeros)


def test_gptq_layout_hand_computed_8_bit() -> None:
    q = torch.tensor([[1, 2, 3, 255], [4, 5, 6, 7], [0, 0, 0, 0], [9, 9, 9, 9]], dtype=torch.uint8)
    zeros = torch.tensor([[128], [1], [2], [256]], dtype=torch.int32)
    gptq = pack_gptq(q, zeros, torch.ones(4, 1), bits=8)
    assert gptq.qweight.shape == (1, 4)
    assert gptq.qweight[0].tolist() == [_int32(0xFF030201), 0x07060504, 0, 0x09090909]
    # Stored zeros 127, 0, 1, 255 in byte order.
    assert gptq.qzeros.item() == _int32(0xFF01007F)
    back = unpack_gptq(*gptq, bits=8)
    assert torch.equal(back.q, q) and torch.equal(back.zeros, zeros)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (4, -1), (8, 64), (8, -1)])
def test_gptq_round_trip_random(bits: int, group_size: int) -> None:
    g = _gen(bits + group_size)
    out_features, in_features = 16, 256
    group = in_features if group_size == -1 else group_size
    num_groups = in_features // group
    q = torch.randint(0, 1 << bits, (out_features, in_features), generator=g).to(torch.uint8)
    zeros = torch.randint(1, (1 << bits) + 1, (out_features, num_groups), generator=g).to(
        torch.int32
    )
    scales = torch.rand(out_features, num_groups, generator=g).half()
    gptq = pack_gptq(q, zeros, scales, bits=bits)
    n = 32 // bits
    assert gptq.qweight.shape == (in_features // n, out_features)
    assert gptq.qzeros.shape == (num_groups, out_features // n)
    assert gptq.scales.shape == (num_groups, out_features)
    assert torch.equal(gptq.g_idx, torch.arange(in_features, dtype=torch.int32) // group)
    back = unpack_gptq(*gptq, bits=bits)
    assert torch.equal(back.q, q) and torch.equal(back.zeros, zeros)
    assert torch.equal(back.scales, scales)


def test_gptq_v1_offset_rejects_zero_0_and_v2_stores_it() -> None:
    q = torch.zeros(8, 8, dtype=torch.uint8)
    zeros = torch.zeros(8, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="zeros must be in"):
        pack_gptq(q, zeros, torch.ones(8, 1))
    v2 = pack_gptq(q, zeros, torch.ones(8, 1), zero_offset=0)
    assert torch.equal(unpack_gptq(*v2, zero_offset=0).zeros, zeros)


def test_gptq_v1_unpack_reads_stored_plus_one_without_wrapping() -> None:
    # A stored nibble of 15 is zero 16, as v1 kernels compute it.
    qzeros = torch.tensor([[_int32(0xFFFFFFFF)]], dtype=torch.int32)
    back = unpack_gptq(torch.zeros(1, 8, dtype=torch.int32), qzeros, torch.ones(1, 8).half())
    assert back.zeros.flatten().tolist() == [16] * 8


def test_gptq_rejects_act_order_g_idx() -> None:
    gptq = pack_gptq(
        torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2, dtype=torch.int32), torch.ones(8, 2)
    )
    permuted = gptq.g_idx.flip(0)
    with pytest.raises(NotImplementedError, match="act-order"):
        unpack_gptq(gptq.qweight, gptq.qzeros, gptq.scales, permuted)


def test_quantized_weights_survive_both_layouts() -> None:
    weight = torch.randn(32, 256, generator=_gen(5))
    q, scale, zero = quantize_groupwise_asymmetric(weight, 128)
    scale = scale.half().float()  # the checkpoint formats hold fp16 scales
    expected = dequantize(q, scale, zero)
    awq = unpack_awq(*pack_awq(q, zero, scale))
    assert torch.equal(dequantize(awq.q, awq.scales, awq.zeros), expected)
    shifted = zero.clamp(min=1)  # v1 cannot store zero 0; compare only the layout here
    gptq = unpack_gptq(*pack_gptq(q, shifted, scale))
    assert torch.equal(dequantize(gptq.q, gptq.scales, gptq.zeros), dequantize(q, scale, shifted))
