"""rms_norm (Triton) against its PyTorch reference, and RMSNorm's dispatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from rtllm.layers import norm as norm_module  # noqa: E402
from rtllm.layers.norm import RMSNorm  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EPS = 1e-6


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # One 16-bit rounding may flip between reduction orders; float32 differs by a few ulp.
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [64, 100])
def test_matches_reference(device: torch.device, dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(n, generator=gen)).to(device, dtype)
    torch.testing.assert_close(
        rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS), **_tol(dtype)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_residual(device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 48, generator=gen).to(device, dtype)
    residual = torch.randn(6, 48, generator=gen).to(device, dtype)
    weight = torch.randn(48, generator=gen).to(device, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    out, summed = rms_norm(x, weight, EPS, residual)
    ref_out, ref_summed = rms_norm_ref(x, weight, EPS, residual)
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)  # rounded like x + residual
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_inplace(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 32, generator=gen).to(device, torch.float16)
    residual = torch.randn(4, 32, generator=gen).to(device, torch.float16)
    weight = torch.randn(32, generator=gen).to(device, torch.float16)
    expected_out, expected_summed = rms_norm(x, weight, EPS, residual)
    out, summed = rms_norm(x, weight, EPS, residual, inplace=True)
    assert out is x and summed is residual
    torch.testing.assert_close(x, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(residual, expected_summed, rtol=0, atol=0)


def test_per_head_norm_over_strided_view(device: torch.device) -> None:
    """q/k norm: rows = T * H of a [T, H, D] view into a fused QKV buffer."""
    tokens, heads, kv_heads, head_dim = 3, 4, 2, 16
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    assert not q.is_contiguous()
    weight = torch.randn(head_dim, generator=gen).to(device)
    for t in (q, k):
        out = rms_norm(t, weight, EPS)
        assert out.shape == t.shape and out.is_contiguous()
        torch.testing.assert_close(out, rms_norm_ref(t, weight, EPS), rtol=1e-5, atol=1e-5)


def test_float32_weight_promotes_output(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 32, generator=gen).to(device, torch.float16)
    weight = torch.randn(32, generator=gen).to(device)
    out = rms_norm(x, weight, EPS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), rtol=1e-5, atol=1e-5)


def test_empty_input(device: torch.device) -> None:
    x = torch.empty(0, 32, device=device)
    assert rms_norm(x, torch.ones(32, device=device), EPS).shape == (0, 32)


def test_rejects_bad_inputs() -> None:
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(16), EPS)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, torch.ones(32), EPS, torch.randn(4, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(32, 4).t(), torch.ones(32), EPS)
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(torch.randn(32), torch.ones(32), EPS)
    with pytest.raises(ValueError, match="inplace"):
        rms_norm(x.half(), torch.ones(32), EPS, inplace=True)


# ---- the layer's CPU path is the PyTorch formula, untouched --------------------------


def _layer(hidden: int, dtype: torch.dtype) -> RMSNorm:
    layer = RMSNorm(hidden, eps=1e-5).to(dtype)
    layer.weight.data = torch.linspace(0.5, 1.5, hidden).to(dtype)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_cpu_path_is_the_reference_formula(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_kernel(*args: object) -> None:
        raise AssertionError("the Triton kernel must not be looked up on CPU")

    monkeypatch.setattr(norm_module, "fused_kernel", no_kernel)
    layer = _layer(64, dtype)
    x = torch.randn(5, 64).to(dtype)
    residual = torch.randn(5, 64).to(dtype)

    def formula(t: torch.Tensor) -> torch.Tensor:
        t32 = t.float()
        return layer.weight * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(
            dtype
        )

    assert torch.equal(layer(x), formula(x))
    out, summed = layer(x, residual)
    assert torch.equal(summed, x + residual)
    assert torch.equal(out, formula(x + residual))


# ---- GPU ---------------------------------------------------------------------------------


# Two bfloat16 roundings apart (the kernel and the reference round at different steps):
# 2 ulp relative. Seen once: 1 of 8.4M elements 2 ulp off at rtol 8e-3 (1 ulp).
GPU_TOLERANCE = {"rtol": 1.6e-2, "atol": 8e-3}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 8192])
def test_gpu_hidden_4096(dtype: torch.dtype, tokens: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 4096, device="cuda", dtype=dtype, generator=gen)
    residual = torch.randn(tokens, 4096, device="cuda", dtype=dtype, generator=gen)
    weight = (1 + 0.1 * torch.randn(4096, device="cuda", generator=gen)).to(dtype)
    out, summed = rms_norm(x, weight, EPS, residual)
    ref_out, ref_summed = rms_norm_ref(x, weight, EPS, residual)
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)
    # The float32 reduction order differs from torch's, so a value near a 16-bit
    # rounding boundary can land one or two units in the last place apart.
    torch.testing.assert_close(out, ref_out, **GPU_TOLERANCE)
    torch.testing.assert_close(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS), **GPU_TOLERANCE)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_qk_norm(dtype: torch.dtype, head_dim: int) -> None:
    tokens, heads, kv_heads = 8192, 32, 8
    torch.manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    weight = torch.rand(head_dim, device="cuda", dtype=dtype) + 0.5
    for t in (q, k):
        torch.testing.assert_close(rms_norm(t, weight, EPS), rms_norm_ref(t, weight, EPS), **GPU_TOLERANCE)


@pytest.mark.gpu
@requires_cuda
def test_gpu_layer_uses_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = norm_module.fused_kernel("rms_norm", "rms_norm")
    assert real is not None, "Triton should import on a CUDA machine"

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(norm_module, "fused_kernel", lambda *args: counting)
    layer = _layer(4096, torch.bfloat16).cuda()
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    out, summed = layer(x, residual)
    assert calls == [1]
    ref_out, ref_summed = rms_norm_ref(x, layer.weight, layer.eps, residual)
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out)
