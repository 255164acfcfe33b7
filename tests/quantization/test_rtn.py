"""Round-to-nearest quantizers: shapes, dtypes, error bounds and degenerate inputs.

Bounds tested:

* integer RTN: every element satisfies ``|w - dq(q(w))| <= scale / 2`` (up to float32
  rounding of ``w / scale``: a relative 1e-5 slack);
* FP8 E4M3 (3 mantissa bits): ``|w - dq| <= 2**-4 |w|`` for values in the normal range
  and ``<= 2**-10 * scale`` (half the subnormal spacing) below it.
"""

from __future__ import annotations

import pytest
import torch

from rtllm.quantization.rtn import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
    quantize_groupwise_asymmetric,
    quantize_groupwise_symmetric,
    quantize_int8_per_channel,
    quantize_per_token_fp8,
    quantize_per_token_int8,
)


def _weight(out_features: int = 48, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    # Rows at very different magnitudes exercise per-row and per-group scales.
    return w * torch.logspace(-3, 1, out_features).view(-1, 1)


def _expand(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    return scale.repeat_interleave(in_features // scale.shape[1], dim=1)


def _assert_half_step(w: torch.Tensor, dq: torch.Tensor, step: torch.Tensor) -> None:
    assert torch.all((w - dq).abs() <= step / 2 * (1 + 1e-5) + 1e-30)


def _assert_fp8_bound(x: torch.Tensor, dq: torch.Tensor, scale: torch.Tensor) -> None:
    err = (x - dq).abs()
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-5)
    assert torch.all(err <= bound)


def test_int8_per_channel() -> None:
    w = _weight()
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], 1)
    assert int(q.abs().max()) == 127  # each row's largest |w| maps to +-127
    torch.testing.assert_close(scale.view(-1), w.abs().amax(dim=1) / 127)
    _assert_half_step(w, dequantize(q, scale), scale.expand_as(w))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_groupwise_symmetric(bits: int, group_size: int) -> None:
    w = _weight()
    q, scale = quantize_groupwise_symmetric(w, group_size, bits)
    num_groups = 1 if group_size == -1 else w.shape[1] // group_size
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], num_groups)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.max()) <= qmax and int(q.min()) >= -qmax - 1
    _assert_half_step(w, dequantize(q, scale), _expand(scale, w.shape[1]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_groupwise_asymmetric(bits: int, group_size: int) -> None:
    w = _weight() + 0.3  # shifted: the zero point matters
    q, scale, zero = quantize_groupwise_asymmetric(w, group_size, bits)
    num_groups = 1 if group_size == -1 else w.shape[1] // group_size
    assert q.dtype == torch.uint8 and q.shape == w.shape
    assert scale.shape == zero.shape == (w.shape[0], num_groups)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert int(q.max()) <= 2**bits - 1
    assert int(zero.min()) >= 0 and int(zero.max()) <= 2**bits - 1
    _assert_half_step(w, dequantize(q, scale, zero), _expand(scale, w.shape[1]))


def test_asymmetric_beats_symmetric_on_one_sided_groups() -> None:
    w = _weight().abs()  # all positive: symmetric wastes half its codes
    qs, ss = quantize_groupwise_symmetric(w, 128)
    qa, sa, za = quantize_groupwise_asymmetric(w, 128)
    assert (w - dequantize(qa, sa, za)).norm() < 0.6 * (w - dequantize(qs, ss)).norm()


def test_all_zero_rows_and_groups_give_finite_scales() -> None:
    w = _weight(8, 256)
    w[0] = 0.0  # a whole row
    w[1, :128] = 0.0  # one group of a row
    results = [
        quantize_int8_per_channel(w),
        quantize_groupwise_symmetric(w, 128),
        quantize_groupwise_asymmetric(w, 128),
        quantize_fp8_per_channel(w),
        quantize_fp8_per_tensor(torch.zeros(4, 8)),
    ]
    for q, scale, *zero in results:
        assert torch.isfinite(scale).all() and (scale > 0).all()
        dq = dequantize(q, scale, *zero)
        assert torch.isfinite(dq).all()
    for q, scale, *zero in results[:4]:
        dq = dequantize(q, scale, *zero)
        assert torch.all(dq[0] == 0) and torch.all(dq[1, :128] == 0)
    q, scale = results[4]
    assert torch.all(dequantize(q, scale) == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weight_quantizers_reject_non_finite(bad: float) -> None:
    w = _weight(4, 64)
    w[2, 3] = bad
    for fn in (quantize_int8_per_channel, quantize_fp8_per_tensor, quantize_fp8_per_channel):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(w)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_groupwise_asymmetric(w, 32)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize_groupwise_symmetric(_weight(4, 96), 64)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_per_channel(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="float"):
        quantize_int8_per_channel(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="bits"):
        quantize_groupwise_symmetric(_weight(4, 64), 32, bits=3)


def test_fp8_per_tensor() -> None:
    w = _weight()
    q, scale = quantize_fp8_per_tensor(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert float(q.float().abs().max()) == FP8_MAX
    _assert_fp8_bound(w, dequantize(q, scale), scale)


def test_fp8_per_channel() -> None:
    w = _weight()
    q, scale = quantize_fp8_per_channel(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (w.shape[0], 1)
    dq = dequantize(q, scale)
    _assert_fp8_bound(w, dq, scale)
    # Rows 1e5 times smaller than the rest fall into FP8's subnormals (or to 0) under one
    # per-tensor scale; per-channel scales keep them at full relative precision.
    w = _weight(8, 256)
    w = w / w.abs().amax(dim=1, keepdim=True)
    w[:4] *= 1e-5
    dq = dequantize(*quantize_fp8_per_channel(w))
    dq_tensor = dequantize(*quantize_fp8_per_tensor(w))
    err_channel = (w[:4] - dq[:4]).norm()
    assert err_channel < 0.04 * w[:4].norm()
    assert err_channel < 0.1 * (w[:4] - dq_tensor[:4]).norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_fp8(dtype: torch.dtype) -> None:
    x = (torch.randn(2, 7, 64) * torch.logspace(-2, 2, 7).view(1, 7, 1)).to(dtype)
    x[1, 3] = 0.0
    q, scale = quantize_per_token_fp8(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 7, 1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    dq = dequantize(q, scale)
    assert torch.all(dq[1, 3] == 0)
    _assert_fp8_bound(x.float(), dq, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_int8(dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5, 64) * torch.logspace(-2, 2, 5).view(1, 5, 1)).to(dtype)
    x[0, 0] = 0.0
    q, scale = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (3, 5, 1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    dq = dequantize(q, scale)
    assert torch.all(dq[0, 0] == 0)
    _assert_half_step(x.float(), dq, scale.expand_as(dq))


def test_dequantize_output_dtype() -> None:
    q, scale = quantize_int8_per_channel(_weight())
    out = dequantize(q, scale, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, dequantize(q, scale).bfloat16())
