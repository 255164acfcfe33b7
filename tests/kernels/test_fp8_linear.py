"""fp8_linear (torch._scaled_mm) and the per-token FP8 quantizer against the reference.

On GPUs with FP8 (capability >= 8.9) both operands are the same FP8 values in kernel
and reference, which accumulate in float32: they differ by the output rounding
(bfloat16 ~4e-3 normalized) and summation order only.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.fp8_linear import (  # noqa: E402
    fp8_linear,
    fp8_linear_ref,
    fp8_supported,
    quantize_per_token_fp8,
)
from rtllm.quantization import rtn  # noqa: E402
from rtllm.quantization.act_quant import Fp8Linear  # noqa: E402
from rtllm.quantization.config import QuantAlgo, QuantConfig  # noqa: E402

requires_fp8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8_supported("cuda")), reason="needs an FP8 GPU"
)


def _norm_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_cpu_is_the_reference_and_matches_fp8_layer() -> None:
    assert not fp8_supported("cpu")
    w = torch.randn(48, 64)
    bias = torch.randn(48)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    layer = Fp8Linear.from_float(w, bias, QuantConfig(quant_algo=QuantAlgo.FP8))
    out = fp8_linear(x, layer.weight, layer.weight_scale, bias=layer.bias)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fp8_linear_ref(x, layer.weight, layer.weight_scale, bias=layer.bias))
    torch.testing.assert_close(out, layer(x), rtol=1e-2, atol=1e-2)
    # Static input scale and per-channel weights, float32 output.
    q, s = rtn.quantize_fp8_per_channel(w)
    out = fp8_linear(x, q, s, input_scale=0.02, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (5, 48)
    assert _norm_err(out, x.float() @ w.t()) < 0.1  # FP8 E4M3: ~6% per element


def test_rejects_bad_inputs() -> None:
    q, s = rtn.quantize_fp8_per_tensor(torch.randn(16, 32))
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.randn(2, 16), q, s)
    with pytest.raises(ValueError, match="w_scale"):
        fp8_linear(torch.randn(2, 32), q, torch.ones(3))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.randn(2, 32), q.float(), s)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_linear(torch.randn(2, 32), q, s, out_dtype=torch.int8)


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_fp8
@pytest.mark.parametrize("k", [16, 4096, 14336])
def test_gpu_per_token_quantizer_is_exact(k: int) -> None:
    x = 3 * torch.randn(37, k, device="cuda", dtype=torch.bfloat16)
    x[3] = 0  # all-zero row: scale 1
    q, scale = quantize_per_token_fp8(x)
    q_ref, scale_ref = rtn.quantize_per_token_fp8(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@requires_fp8
@pytest.mark.parametrize("m", [1, 16, 100])
@pytest.mark.parametrize(("k", "n"), [(4096, 4096), (4096, 28672)])
@pytest.mark.parametrize(
    "scheme", ["tensor_dynamic", "channel_dynamic", "tensor_static", "channel_static"]
)
def test_gpu_matches_reference(m: int, k: int, n: int, scheme: str) -> None:
    w = torch.randn(n, k, device="cuda") * 0.02
    per_channel = scheme.startswith("channel")
    q, s = rtn.quantize_fp8_per_channel(w) if per_channel else rtn.quantize_fp8_per_tensor(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    input_scale = 4.0 / rtn.FP8_MAX if scheme.endswith("static") else None
    out = fp8_linear(x, q, s, input_scale=input_scale)
    ref = fp8_linear_ref(x, q, s, input_scale=input_scale)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert _norm_err(out, ref) < 1e-2


@pytest.mark.gpu
@requires_fp8
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_out_dtypes_bias_and_leading_dims(out_dtype: torch.dtype) -> None:
    w = torch.randn(512, 1024, device="cuda") * 0.02
    q, s = rtn.quantize_fp8_per_tensor(w)
    x = torch.randn(2, 7, 1024, device="cuda", dtype=torch.float16)
    bias = torch.randn(512, device="cuda")
    for input_scale in (None, 4.0 / rtn.FP8_MAX):
        out = fp8_linear(x, q, s, input_scale=input_scale, bias=bias, out_dtype=out_dtype)
        ref = fp8_linear_ref(x, q, s, input_scale=input_scale, bias=bias, out_dtype=out_dtype)
        assert out.shape == (2, 7, 512) and out.dtype == out_dtype
        assert _norm_err(out, ref) < 1e-2
