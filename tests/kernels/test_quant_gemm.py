"""W4A16 / W8A16 Triton GEMV / GEMM / dequantize paths against the dequantize-then-matmul
reference (``rtllm.kernels.quant_gemm``, ``quant_gemv``, ``quant_layout``, ``quant_tuning``).

CPU runs go through Triton's interpreter (tiny shapes, float16/float32: the
interpreter's bf16 ``tl.dot`` is not trustworthy). Tolerances are on the normalized
error ``||out - ref|| / ||ref||`` plus an elementwise bound scaled by ``rms(ref)``:

* float32 activations: 5e-5 (the GEMV kernel's magic-offset cancellation costs ~1e-5);
* float16: 2e-3; bfloat16 (GPU): 1e-2. The reference rounds the dequantized weight to
  the activation dtype like the GEMM kernel's ``tl.dot`` operands; the GEMV kernel keeps
  float32 weights, one 16-bit ulp or so away.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.quant_gemm import (  # noqa: E402
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    PackedInt4Weight,
    PackedInt8Weight,
    QuantGemmConfig,
    candidates,
    dequantize_packed,
    dequantize_weight,
    prepack_int4,
    prepack_int8,
    quant_linear,
    quant_linear_ref,
    quant_linear_silu_and_mul,
    unpack_codes,
    w4a16_linear,
    w8a16_linear,
)
from rtllm.kernels.quant_gemv import GemvConfig, quant_gemv  # noqa: E402
from rtllm.kernels.quant_layout import PackedQuantWeight  # noqa: E402
from rtllm.quantization.rtn import (  # noqa: E402
    dequantize,
    quantize_groupwise_asymmetric,
    quantize_int8_per_channel,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_packed(
    n: int,
    k: int,
    bits: int,
    group_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> PackedInt4Weight | PackedInt8Weight:
    """Random codes, zeros anywhere in range and scales spread over two decades."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.int32)
    scales = torch.exp(torch.empty(n, groups).uniform_(-6.5, -2.0, generator=gen))
    pack = prepack_int4 if bits == 4 else prepack_int8
    return pack(codes, zeros, scales, group_size, scale_dtype=scale_dtype, device=device)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    tol = _TOL[ref.dtype]
    o, r = out.float(), ref.float()
    err = ((o - r).norm() / r.norm()).item()
    assert err < tol, f"normalized error {err:.2e} >= {tol:.0e}"
    rms = r.pow(2).mean().sqrt().item()
    torch.testing.assert_close(o, r, rtol=5 * tol, atol=10 * tol * rms)


# ---- packing -----------------------------------------------------------------------------


def test_docstring_example_words() -> None:
    codes = (torch.arange(32) % 16).to(torch.uint8)[None]
    p = prepack_int4(codes, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), -1)
    # Fields 0xC840C840, 0xD951D951, ... rotated left by WORD_ROTATION[4] = 1 bit.
    assert [w & 0xFFFFFFFF for w in p.qweight[0].tolist()] == [
        0x90819081,
        0xB2A3B2A3,
        0xD4C5D4C5,
        0xF6E7F6E7,
    ]


def test_int8_words_rotated() -> None:
    codes = torch.tensor(
        [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255]], dtype=torch.uint8
    )
    p = prepack_int8(codes, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), -1)
    # Word c holds channels c, 4 + c, 8 + c, 12 + c (fields 0..3), rotated left by 5.
    for c, word in enumerate(p.qweight[0].tolist()):
        plain = sum(int(codes[0, 4 * j + c]) << (8 * j) for j in range(4))
        assert word & 0xFFFFFFFF == ((plain << 5) | (plain >> 27)) & 0xFFFFFFFF


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (4, -1), (8, 16), (8, -1)])
def test_pack_round_trip(bits: int, group_size: int) -> None:
    n, k = 24, 256
    p = random_packed(n, k, bits, group_size, scale_dtype=torch.float32)
    f = 32 // bits
    assert p.qweight.shape == (n, k // f) and p.qweight.dtype == torch.int32
    groups = 1 if group_size == -1 else k // group_size
    assert p.scales.shape == p.zeros.shape == (groups, n)
    assert p.per_channel == (group_size == -1)
    # Rebuild the internal layout from the packed one; it must dequantize identically.
    codes = unpack_codes(p)
    zeros = p.zeros.t().to(torch.int32)
    scales = p.scales.t()
    again = (prepack_int4 if bits == 4 else prepack_int8)(
        codes, zeros, scales, group_size, scale_dtype=torch.float32
    )
    assert torch.equal(again.qweight, p.qweight)
    torch.testing.assert_close(
        dequantize_packed(p), dequantize(codes, scales, zeros), rtol=0, atol=0
    )


def test_rtn_weights_survive_packing() -> None:
    w = torch.randn(40, 128) * 0.05
    q, scale, zero = quantize_groupwise_asymmetric(w, 32, bits=4)
    p = prepack_int4(q, zero, scale, 32)  # float16 scales: < 2.5e-4 relative each
    assert torch.equal(unpack_codes(p), q)
    torch.testing.assert_close(
        dequantize_packed(p), dequantize(q, scale, zero), rtol=5e-4, atol=1e-6
    )
    q8, s8 = quantize_int8_per_channel(w)
    p8 = prepack_int8((q8.to(torch.int16) + 128).to(torch.uint8), torch.full((40, 1), 128), s8)
    torch.testing.assert_close(dequantize_packed(p8), dequantize(q8, s8), rtol=5e-4, atol=1e-6)


def test_prepack_rejects_bad_inputs() -> None:
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    zeros = torch.zeros(8, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiples of 32"):
        prepack_int4(codes, zeros, torch.ones(8, 4), 16)
    with pytest.raises(ValueError, match="must be"):
        prepack_int4(codes, zeros, torch.ones(8, 2), 32)
    with pytest.raises(ValueError, match="codes must be in"):
        prepack_int4(codes + 16, zeros[:, :2], torch.ones(8, 2), 32)
    with pytest.raises(ValueError, match="finite"):
        prepack_int4(codes, zeros[:, :2], torch.full((8, 2), 1e6), 32)
    with pytest.raises(ValueError, match="does not divide"):
        prepack_int8(codes, zeros[:, :1], torch.ones(8, 1), 48)


# ---- kernels on CPU (interpreter) ----------------------------------------------------------

_QUANTS = [(4, 32), (4, 64), (4, 128), (4, -1), (8, -1), (8, 16)]


@pytest.mark.parametrize(("bits", "group_size"), _QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_matches_reference(
    device: torch.device, bits: int, group_size: int, dtype: torch.dtype
) -> None:
    # N = 13: partial channel tile; K = 384: 12 int4 / 24 int8 blocks, so 8 blocks per
    # step leave a partial last step.
    n, k = 13, 384
    p = random_packed(n, k, bits, group_size, device, seed=bits + group_size)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=gen).to(device, dtype)
    cfg = QuantGemmConfig(kernel="gemv", block_n=8, chunk=8, split_k=1, num_warps=1)
    for m in (1, 3, 8):
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        out = quant_linear(x, p, bias if m != 3 else None, cfg)
        assert_matches(out, quant_linear_ref(x, p, bias if m != 3 else None))


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (8, -1)])
@pytest.mark.parametrize(("split_k", "prefetch"), [(2, 1), (3, 1), (1, 2), (3, 2)])
def test_gemv_split_k_single_launch(
    device: torch.device, bits: int, group_size: int, split_k: int, prefetch: int
) -> None:
    """Split-K partials reduced by the last slice; the counters reset between calls.
    Prefetch 2 (two steps of weight loads in flight) gives the same sums, with slices
    shorter and longer than two steps."""
    n, k = 24, 512
    p = random_packed(n, k, bits, group_size, device, seed=split_k)
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(n, generator=gen).to(device, torch.float16)
    cfg = QuantGemmConfig(
        kernel="gemv", block_n=4, chunk=4, split_k=split_k, num_warps=1, num_stages=prefetch
    )
    for m in (1, 3):
        x = torch.randn(m, k, generator=gen).to(device, torch.float16)
        assert_matches(quant_linear(x, p, bias, cfg), quant_linear_ref(x, p, bias))
    from rtllm.kernels.split_counters import split_counters

    assert int(split_counters(device).abs().sum()) == 0


def test_gemv_row_tiles_beyond_block_m(device: torch.device) -> None:
    """A forced GEMV with M > 8 runs row tiles of 8."""
    n, k = 16, 128
    p = random_packed(n, k, 4, 32, device)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(5)).to(device, torch.float16)
    cfg = QuantGemmConfig(kernel="gemv", block_n=4, chunk=4, split_k=1, num_warps=1)
    assert_matches(quant_linear(x, p, None, cfg), quant_linear_ref(x, p))


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, -1), (8, 16), (8, -1)])
def test_dequantize_weight_kernel(device: torch.device, bits: int, group_size: int) -> None:
    n, k = 20, 256
    p = random_packed(n, k, bits, group_size, device, seed=9)
    torch.testing.assert_close(
        dequantize_weight(p, torch.float32), dequantize_packed(p).to(device), rtol=0, atol=0
    )
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(6)).to(device, torch.float16)
    out = quant_linear(x, p, None, QuantGemmConfig(kernel="dequant"))
    assert_matches(out, quant_linear_ref(x, p))


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (4, -1), (8, -1), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_matches_reference(
    device: torch.device, bits: int, group_size: int, dtype: torch.dtype
) -> None:
    n, k = 80, 128 if bits == 4 else 192
    p = random_packed(n, k, bits, group_size, device, seed=7 * bits - group_size)
    gen = torch.Generator().manual_seed(2)
    for m in (1, 3, 17, 64):
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        bias = torch.randn(n, generator=gen).to(device, dtype) if m % 2 else None
        out = quant_linear(x, p, bias, QuantGemmConfig(kernel="gemm", block_m=16, block_n=32))
        assert_matches(out, quant_linear_ref(x, p, bias))


def test_gemm_split_k(device: torch.device) -> None:
    n, k = 48, 384
    p = random_packed(n, k, 4, 64, device, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, k, generator=gen).to(device, torch.float16)
    bias = torch.randn(n, generator=gen).to(device, torch.float16)
    cfg = QuantGemmConfig(kernel="gemm", chunk=4, split_k=3, block_m=16, block_n=16)
    assert_matches(quant_linear(x, p, bias, cfg), quant_linear_ref(x, p, bias))


@pytest.mark.parametrize("m", [1, 4, 8, 16, 64, 2048])
@pytest.mark.parametrize(("k", "n"), [(4096, 6144), (4096, 28672), (14336, 4096)])
@pytest.mark.parametrize("bits", [4, 8])
def test_candidates(m: int, k: int, n: int, bits: int) -> None:
    """Every tuning candidate is launchable: GEMV only up to GEMV_MAX_M and within its
    register budget, dequantize-then-cuBLAS only from DEQUANT_MIN_M."""
    cands = candidates(m, n, k, bits, num_sms=132)
    assert cands and len(cands) <= (20 if m == 1 else 10)  # M = 1: both prefetch depths
    kinds = {c.kernel for c in cands}
    assert ("gemv" in kinds) == (m <= GEMV_MAX_M)
    assert ("gemm" in kinds) == (m > 1)
    assert ("dequant" in kinds) == (m >= DEQUANT_MIN_M)
    for c in cands:
        if c.kernel == "gemv":
            assert c.chunk == 32 * c.num_warps and c.split_k >= 1
            assert c.num_stages in (None, 2) and (c.num_stages is None or m == 1)
            assert triton_next_pow2(m) * c.block_n <= 16


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def test_dispatch_leading_dims_and_strided_rows(device: torch.device) -> None:
    n, k = 32, 128
    p4 = random_packed(n, k, 4, 128, device)
    p8 = random_packed(n, k, 8, -1, device)
    gen = torch.Generator().manual_seed(4)
    x3 = torch.randn(2, 3, k, generator=gen).to(device, torch.float16)
    out = w4a16_linear(x3, p4)
    assert out.shape == (2, 3, n)
    assert_matches(out, quant_linear_ref(x3, p4))
    wide = torch.randn(1, 2 * k, generator=gen).to(device, torch.float16)
    x1 = wide[:, :k]  # one row, stride 2k
    assert_matches(w8a16_linear(x1, p8), quant_linear_ref(x1, p8))
    assert w8a16_linear(x1[:0], p8).shape == (0, n)


def test_launcher_rejects_bad_inputs() -> None:
    p4 = random_packed(16, 64, 4, 32)
    p8 = random_packed(16, 64, 8, -1)
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="4-bit"):
        w4a16_linear(x, p8)
    with pytest.raises(ValueError, match="8-bit"):
        w8a16_linear(x, p4)
    with pytest.raises(ValueError, match="features"):
        w4a16_linear(torch.randn(2, 32, dtype=torch.float16), p4)
    with pytest.raises(ValueError, match="float16"):
        w4a16_linear(x.to(torch.int32), p4)
    with pytest.raises(ValueError, match="bias"):
        w4a16_linear(x, p4, torch.zeros(8))
    with pytest.raises(ValueError, match="kernel"):
        quant_linear(x, p4, config=QuantGemmConfig(kernel="fast"))
    with pytest.raises(ValueError, match="power of two"):
        quant_linear(x, p4, config=QuantGemmConfig(kernel="gemv", block_n=8, chunk=24))
    with pytest.raises(ValueError, match="chunk"):
        quant_linear(x, p4, config=QuantGemmConfig(kernel="gemm", chunk=2))


# ---- gated GEMV: silu(gate) * up in the epilogue ------------------------------------------


def _unfused_silu(x: torch.Tensor, p: PackedQuantWeight, bias: torch.Tensor | None,
                  cfg: GemvConfig) -> torch.Tensor:
    """The unfused path: the plain GEMV's 16-bit output, then silu(gate) * up in float32
    rounded to the output dtype (what the separate silu_and_mul kernel computes)."""
    y = torch.empty(x.shape[0], p.out_features, dtype=x.dtype, device=x.device)
    quant_gemv(x, p, bias, y, cfg)
    gate, up = y.float().chunk(2, dim=-1)
    return (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (4, -1), (8, -1)])
@pytest.mark.parametrize(("block_n", "split_k"), [(1, 1), (4, 1), (8, 3)])
def test_gated_gemv_pairs_gate_and_up_rows(
    device: torch.device, bits: int, group_size: int, block_n: int, split_k: int
) -> None:
    """d = 11: the last tile is partial in both halves, so a wrong pairing or mask shows;
    matches the unfused GEMV followed by silu(gate) * up (to float16 rounding of exp)."""
    d, k = 11, 256
    p = random_packed(2 * d, k, bits, group_size, device, seed=block_n + split_k)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(2 * d, generator=gen).to(device, torch.float16)
    cfg = GemvConfig(block_n=block_n, blocks=4, split_k=split_k, num_warps=1)
    for m, b in ((1, bias), (3, None)):
        x = torch.randn(m, k, generator=gen).to(device, torch.float16)
        out = torch.full((m, d), float("nan"), dtype=torch.float16, device=device)
        quant_gemv(x, p, b, out, cfg, gated=True)
        torch.testing.assert_close(out, _unfused_silu(x, p, b, replace(cfg, block_n=max(block_n, 2))),
                                   rtol=2e-3, atol=1e-4)


def test_quant_linear_silu_and_mul_any_size(device: torch.device) -> None:
    """The public entry point: leading dims kept; a size the GEMV does not take (M > 8)
    goes through the GEMM and the separate activation kernel, with the same result."""
    d, k = 24, 128
    p = random_packed(2 * d, k, 4, 32, device, seed=9)
    gen = torch.Generator().manual_seed(2)
    for shape in ((1, k), (2, 2, k), (12, k)):
        x = torch.randn(*shape, generator=gen).to(device, torch.float16)
        gate, up = quant_linear_ref(x.reshape(-1, k), p).float().chunk(2, dim=-1)
        ref = (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype).reshape(*shape[:-1], d)
        assert_matches(quant_linear_silu_and_mul(x, p), ref)
    with pytest.raises(ValueError, match="even number of rows"):
        quant_linear_silu_and_mul(x, random_packed(2 * d + 1, k, 4, 32, device))


def test_fused_activation_only_where_the_gemv_kernel_runs() -> None:
    """The layer hook declines (``None``: the caller runs the layer, then SiLU-mul) for
    float layers, FP8 layers, per-token FP8 inputs and tensors off the GPU."""
    from rtllm.layers.linear import Linear
    from rtllm.quantization import dispatch, linear_method
    from rtllm.quantization.config import QuantAlgo, QuantConfig
    from rtllm.quantization.rtn import Fp8Tokens

    w, x = torch.randn(32, 64), torch.randn(3, 64)
    int8 = linear_method.quantize_float(QuantConfig(quant_algo=QuantAlgo.W8A16), w, None, None, None)
    fp8 = linear_method.quantize_float(QuantConfig(quant_algo=QuantAlgo.FP8), w, None, None, None)
    assert dispatch.quantized_silu_and_mul_forward(int8, x) is None  # CPU tensor
    assert dispatch.quantized_silu_and_mul_forward(fp8, x) is None
    assert dispatch.quantized_silu_and_mul_forward(fp8, Fp8Tokens.quantize(x)) is None
    assert Linear(64, 32).silu_and_mul_forward(x) is None  # a float layer


# ---- GPU ---------------------------------------------------------------------------------

_LLAMA_SHAPES = [(4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): o, gate_up, down


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("k", "n"), _LLAMA_SHAPES)
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (8, -1)])
def test_gpu_llama_shapes(dtype: torch.dtype, k: int, n: int, bits: int, group_size: int) -> None:
    p = random_packed(n, k, bits, group_size, "cuda", seed=k + n)
    for m in (1, 3, 8, 16, 64, 256):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = quant_linear_ref(x, p)
        assert_matches(quant_linear(x, p), ref)  # tuned
        for cfg in candidates(m, n, k, bits, 132):  # every candidate, not only the winner
            assert_matches(quant_linear(x, p, None, cfg), ref)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 64), (4, -1), (8, 128)])
@pytest.mark.parametrize("m", [1, 5, 33, 130])
def test_gpu_groups_and_bias(bits: int, group_size: int, m: int) -> None:
    n, k = 1000, 1536  # partial channel tiles; few tiles, so split-K kicks in
    p = random_packed(n, k, bits, group_size, "cuda", seed=m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    assert_matches(quant_linear(x, p, bias), quant_linear_ref(x, p, bias))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("split_k", "prefetch"), [(1, 1), (4, 1), (1, 2), (4, 2)])
def test_gpu_cuda_graph_replay(split_k: int, prefetch: int) -> None:
    p = random_packed(2048, 1024, 4, 128, "cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    cfg = QuantGemmConfig(
        kernel="gemv", block_n=8, chunk=32, split_k=split_k, num_warps=1, num_stages=prefetch
    )
    quant_linear(x, p, None, cfg)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_linear(x, p, None, cfg)
    for _ in range(3):  # replays reuse the split-K counters: they must come back to 0
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert_matches(out, quant_linear_ref(x, p))
