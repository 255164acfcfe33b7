"""silu_and_mul (Triton) against its PyTorch reference, and SiluAndMul's dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from rtllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref  # noqa: E402
from rtllm.layers import activation as activation_module  # noqa: E402
from rtllm.layers.activation import SiluAndMul  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [8, 100, 1500])  # 1500: two column blocks, the last partial
def test_matches_reference(device: torch.device, dtype: torch.dtype, d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    x = (3 * torch.randn(4, 2 * d, generator=gen)).to(device, dtype)
    out = silu_and_mul(x)
    assert out.shape == (4, d) and out.dtype == dtype
    # One rounding of float32 math in both; a GPU's exp may differ from the CPU's in
    # the last float32 bits, which moves a 16-bit result on a rounding boundary 1 ulp.
    tol = 1e-5 if dtype == torch.float32 else 2.0**-10
    torch.testing.assert_close(out, silu_and_mul_ref(x), rtol=tol, atol=1e-5)


def test_strided_rows_leading_dims_and_out(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 3 * 32, generator=gen).to(device)
    x = wide[:, :64]  # row stride 96
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 64, generator=gen).to(device)
    torch.testing.assert_close(silu_and_mul(x3), silu_and_mul_ref(x3), rtol=1e-5, atol=1e-5)
    out = torch.empty(5, 32, device=device)
    assert silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, silu_and_mul_ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_extreme_values(device: torch.device) -> None:
    gate = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0]])
    x = torch.cat([gate, torch.ones_like(gate)], dim=-1).to(device)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), rtol=1e-5, atol=1e-5)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[\.\.\., 2 \* d\]"):
        silu_and_mul(torch.randn(3, 5))
    with pytest.raises(ValueError, match="float16"):
        silu_and_mul(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(torch.randn(3, 8), out=torch.empty(3, 8))
    with pytest.raises(ValueError, match="contiguous"):
        silu_and_mul(torch.randn(8, 3).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_cpu_path_is_the_reference_formula(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_kernel(*args: object) -> None:
        raise AssertionError("the Triton kernel must not be looked up on CPU")

    monkeypatch.setattr(activation_module, "fused_kernel", no_kernel)
    x = torch.randn(5, 64).to(dtype)
    assert torch.equal(SiluAndMul()(x), F.silu(x[:, :32]) * x[:, 32:])


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 37, 8192])
@pytest.mark.parametrize("d", [11008, 14336])
def test_gpu_realistic(dtype: torch.dtype, tokens: int, d: int) -> None:
    x = 2 * torch.randn(tokens, 2 * d, device="cuda", dtype=dtype)
    out = silu_and_mul(x)
    torch.testing.assert_close(out, silu_and_mul_ref(x))  # dtype defaults
    # Against the layer's PyTorch formula (two roundings): a 16-bit ulp or so apart.
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@requires_cuda
def test_gpu_layer_uses_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = activation_module.fused_kernel("silu_and_mul", "silu_and_mul")
    assert real is not None, "Triton should import on a CUDA machine"

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(x)

    monkeypatch.setattr(activation_module, "fused_kernel", lambda *args: counting)
    x = torch.randn(9, 2 * 4096, device="cuda", dtype=torch.bfloat16)
    out = SiluAndMul()(x)
    assert calls == [1]
    torch.testing.assert_close(out, silu_and_mul_ref(x))
