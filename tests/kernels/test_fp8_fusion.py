"""Per-token FP8 quantization fused into RMSNorm and SiLU-mul (``Fp8Tokens``).

The fused kernels must give the codes and scales of the unfused path (the 16-bit
output, then ``quantize_per_token_fp8``) bit for bit, so an FP8 model computes the
same logits either way. FP8 conversion in Triton runs on FP8 GPUs only (the CPU
interpreter gets float8 wrong); the layer plumbing is checked on the CPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.fp8_linear import fp8_supported, quantize_per_token_fp8  # noqa: E402
from rtllm.layers.activation import SiluAndMul  # noqa: E402
from rtllm.layers.linear import Linear  # noqa: E402
from rtllm.layers.norm import RMSNorm  # noqa: E402
from rtllm.quantization import dispatch, linear_method, rtn  # noqa: E402
from rtllm.quantization.act_quant import Fp8Linear  # noqa: E402
from rtllm.quantization.config import QuantAlgo, QuantConfig  # noqa: E402
from rtllm.quantization.rtn import Fp8Tokens  # noqa: E402

requires_fp8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8_supported("cuda")), reason="needs an FP8 GPU"
)


def _same_tokens(fused: Fp8Tokens, codes: torch.Tensor, scale: torch.Tensor) -> None:
    assert fused.codes.dtype == rtn.FP8_DTYPE and fused.codes.shape == codes.shape
    assert torch.equal(fused.scale, scale)
    assert torch.equal(fused.codes.view(torch.uint8), codes.view(torch.uint8))


def test_cpu_layers_return_tokens_of_their_plain_output() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=gen).to(torch.bfloat16)
    residual = torch.randn(7, 64, generator=gen).to(torch.bfloat16)
    norm = RMSNorm(64)
    norm.weight.data = torch.rand(64, generator=gen) + 0.5
    plain, summed = norm(x, residual)
    tokens, summed_fp8 = norm(x, residual, fp8_out=True)
    assert torch.equal(summed, summed_fp8) and tokens.dtype == plain.dtype
    _same_tokens(tokens, *rtn.quantize_per_token_fp8(plain))
    gate_up = torch.randn(5, 96, generator=gen).to(torch.bfloat16)
    act = SiluAndMul()
    _same_tokens(act(gate_up, fp8_out=True), *rtn.quantize_per_token_fp8(act(gate_up)))


def test_fp8_linear_takes_tokens_like_its_plain_input() -> None:
    gen = torch.Generator().manual_seed(1)
    w, bias = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    layer = Fp8Linear.from_float(w, bias, QuantConfig(quant_algo=QuantAlgo.FP8))
    x = torch.randn(6, 64, generator=gen).to(torch.bfloat16)
    expected = dispatch.quantized_linear_forward(layer, x)
    out = dispatch.quantized_linear_forward(layer, Fp8Tokens.quantize(x))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Only a GPU with FP8 GEMMs asks for tokens (the CPU path quantizes in the linear).
    assert not dispatch.takes_fp8_tokens(layer)


def test_layers_that_quantize_otherwise_refuse_tokens() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen)
    config = QuantConfig(quant_algo=QuantAlgo.W8A16)
    int8 = linear_method.quantize_float(config, w, None, None, None)
    tokens = Fp8Tokens.quantize(torch.randn(3, 64, generator=gen))
    with pytest.raises(ValueError, match="does not take activations quantized per token"):
        dispatch.quantized_linear_forward(int8, tokens)
    assert not dispatch.takes_fp8_tokens(int8)
    assert not Linear(64, 32).fp8_token_input  # a float layer


@pytest.mark.gpu
@requires_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 37, 512])
def test_gpu_rms_norm_fp8_out_is_exact(dtype: torch.dtype, rows: int) -> None:
    from rtllm.kernels.rms_norm import rms_norm

    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", dtype=dtype, generator=gen) * 3
    x[0] = 0  # an all-zero row takes scale 1
    residual = torch.randn(rows, 4096, device="cuda", dtype=dtype, generator=gen)
    weight = (torch.rand(4096, device="cuda", generator=gen) + 0.5).to(dtype)
    plain = rms_norm(x, weight, 1e-5)
    _same_tokens(rms_norm(x, weight, 1e-5, fp8_out=True), *quantize_per_token_fp8(plain))
    plain, summed = rms_norm(x, weight, 1e-5, residual)
    tokens, summed_fp8 = rms_norm(x, weight, 1e-5, residual, fp8_out=True)
    assert torch.equal(summed, summed_fp8) and tokens.dtype == dtype
    _same_tokens(tokens, *quantize_per_token_fp8(plain))


@pytest.mark.gpu
@requires_fp8
@pytest.mark.parametrize("d", [64, 14336, 20000])  # one tile, the Llama-3-8B width, two passes
@pytest.mark.parametrize("rows", [1, 300])
def test_gpu_silu_and_mul_fp8_out_is_exact(d: int, rows: int) -> None:
    from rtllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_fp8

    gen = torch.Generator(device="cuda").manual_seed(d)
    x = torch.randn(rows, 2 * d, device="cuda", dtype=torch.bfloat16, generator=gen) * 4
    x[0, :d] = 0  # silu(0) = 0: an all-zero row
    _same_tokens(silu_and_mul_fp8(x), *quantize_per_token_fp8(silu_and_mul(x)))
