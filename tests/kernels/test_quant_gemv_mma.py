"""The tensor-core int4 GEMV (``rtllm.kernels.quant_gemv_mma``, CUDA C++ through NVRTC).

On the CPU: the fragment mapping the kernel relies on, emulated in torch with the PTX
``mma.m16n8k16`` operand layout (lane ``(g, q)``: A registers ``(row g, k 2q..2q+1)``,
``(row g+8, ..)``, ``(row g, k 2q+8..2q+9)``, ``(row g+8, ..)``; B registers
``(k 2q..2q+1, col g)``, ``(k 2q+8..2q+9, col g)``), plus the launch arithmetic and the
tuner's candidates. On a GPU: the kernel itself against the dequantize-then-matmul
reference, the fused activation, and CUDA graph capture.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels import cuda_jit  # noqa: E402
from rtllm.kernels.quant_gemm import (  # noqa: E402
    QuantGemmConfig,
    candidates,
    quant_linear,
    quant_linear_ref,
    quant_linear_silu_and_mul,
)
from rtllm.kernels.quant_gemv_mma import (  # noqa: E402
    MmaGemvConfig,
    _layout,
    mma_gemv,
    mma_gemv_supported,
)
from rtllm.kernels.quant_tuning import MMA_GEMV_TILES  # noqa: E402
from tests.kernels.test_quant_gemm import assert_matches, random_packed  # noqa: E402

requires_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_jit.available()), reason="needs CUDA and NVRTC"
)
MAGIC = 128.0  # bf16 magic number of the kernel's dequantization (fp16: 1024)


def _pairs(word: int) -> list[tuple[int, int]]:
    """The kernel's dequant_pairs on one stored word: (low, high) 16-bit halves minus the
    magic bits, i.e. ``2 q`` of fields (p, p + 4) for p = 0..3."""
    rotr12 = ((word >> 12) | (word << 20)) & 0xFFFFFFFF
    out = []
    for v in (word, word >> 4, word >> 8, rotr12):
        v &= 0x001E001E
        out.append((v & 0xFFFF, v >> 16))
    return out


def _emulate_block(words: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One 32-channel block through the kernel's two MMAs: ``words`` ``[16, 4]`` (16 rows x
    the block's 4 stored words), ``x`` ``[8, 32]`` (8 columns). Returns D ``[16, 8]``."""
    d = torch.zeros(16, 8, dtype=torch.float64)
    for mma in range(2):
        a = torch.zeros(16, 16, dtype=torch.float64)
        b = torch.zeros(16, 8, dtype=torch.float64)
        for lane in range(32):
            g, q = lane // 4, lane % 4
            lo = _pairs(int(words[g, q]) & 0xFFFFFFFF)
            hi = _pairs(int(words[g + 8, q]) & 0xFFFFFFFF)
            # A registers: (row g, k 2q..), (row g+8, k 2q..), (row g, k 2q+8..), (row g+8, k 2q+8..)
            for reg, (row, k0, pair) in enumerate(
                [(g, 2 * q, lo[2 * mma]), (g + 8, 2 * q, hi[2 * mma]),
                 (g, 2 * q + 8, lo[2 * mma + 1]), (g + 8, 2 * q + 8, hi[2 * mma + 1])]
            ):
                del reg
                a[row, k0] = MAGIC + pair[0]
                a[row, k0 + 1] = MAGIC + pair[1]
            # B registers from the x fragment: channels (4j + q, 4j + q + 16), j = 2 mma, 2 mma + 1
            for k0, j in ((2 * q, 2 * mma), (2 * q + 8, 2 * mma + 1)):
                b[k0, g] = x[g, 4 * j + q]
                b[k0 + 1, g] = x[g, 4 * j + q + 16]
        d += a @ b
    return d


def test_fragment_mapping_computes_the_product() -> None:
    """The documented lane -> fragment mapping, dequantization and zero/scale correction
    give ``x @ dequant(W)^T``, for every row and column."""
    n, k, group = 16, 128, 32
    p = random_packed(n, k, 4, group, seed=3)
    x = torch.randn(8, k, dtype=torch.float64)
    qw = p.qweight.view(n, k // 32, 4)
    out = torch.zeros(n, 8, dtype=torch.float64)
    s = p.scales.double()  # [G, N]
    z = p.zeros.double()
    for blk in range(k // 32):
        d = _emulate_block(qw[:, blk], x[:, 32 * blk : 32 * blk + 32])
        gi = blk * 32 // group
        sx = x[:, 32 * blk : 32 * blk + 32].sum(1)  # [8]
        # acc += s / 2 * (d - (MAGIC + 2 z) * sum x), per row (scale, zero) and column
        out += (s[gi] / 2)[:, None] * (d - (MAGIC + 2 * z[gi])[:, None] * sx[None, :])
    ref = quant_linear_ref(x.float(), p).double()  # [8, n]
    torch.testing.assert_close(out.t(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_blocks", [0, 1, 2, 4, 8])
@pytest.mark.parametrize(("k", "m"), [(4096, 1), (14336, 1), (1056, 5), (4128, 8)])
@pytest.mark.parametrize("cfg", [MmaGemvConfig(*t) for t in MMA_GEMV_TILES] + [MmaGemvConfig(3, 4, 2)])
def test_layout_covers_k_in_whole_groups(group_blocks: int, k: int, m: int, cfg: MmaGemvConfig) -> None:
    num_blocks = k // 32
    if group_blocks and num_blocks % group_blocks:
        pytest.skip("the group size does not divide K")
    per_warp, warps, smem = _layout(k, m, group_blocks, cfg)
    assert per_warp % cfg.step_blocks == 0
    if group_blocks:
        assert per_warp % group_blocks == 0  # a warp's slice starts and ends on groups
    assert warps <= cfg.warps and warps * per_warp >= num_blocks > (warps - 1) * per_warp
    assert smem % 16 == 0 and smem >= 4 * 32 * 4 * warps  # the final reduction fits
    assert smem <= 227 * 1024


def test_not_taken_without_cuda() -> None:
    p = random_packed(64, 256, 4, 128)
    x = torch.randn(1, 256, dtype=torch.float16)
    assert not mma_gemv_supported(x, p)
    with pytest.raises(ValueError, match="mma_gemv_supported"):
        mma_gemv(x, p, None, torch.empty(1, 64, dtype=torch.float16), MmaGemvConfig())


def test_tuner_candidates_add_the_mma_gemv_only_when_supported() -> None:
    plain = candidates(1, 4096, 4096, 4, 132)
    with_mma = candidates(1, 4096, 4096, 4, 132, mma_gemv=True)
    assert with_mma[: len(plain)] == plain  # the untuned default stays the Triton GEMV
    extra = with_mma[len(plain) :]
    assert [c.kernel for c in extra] == ["gemv_mma"] * len(MMA_GEMV_TILES)
    assert {(c.num_warps, c.chunk, c.num_stages) for c in extra} == set(MMA_GEMV_TILES)
    assert all(c.kernel != "gemv_mma" for c in candidates(16, 4096, 4096, 4, 132, mma_gemv=True))


def test_compile_error_names_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        cuda_jit._nvrtc()
    except OSError:
        pytest.skip("no NVRTC library here")
    with pytest.raises(RuntimeError, match="could not compile broken"):
        cuda_jit.compile_cubin("extern \"C\" __global__ void f() { undefined_name; }", "broken", {}, "sm_80")


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gpu_matches_reference(dtype: torch.dtype, group_size: int, m: int) -> None:
    n, k = 512, 4128 if group_size in (32, -1) else 4096  # 4128: a slice ends mid-step
    p = random_packed(n, k, 4, group_size, "cuda", seed=m + group_size)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    assert mma_gemv_supported(x, p)
    for t in [*MMA_GEMV_TILES, (3, 4, 2)]:
        for b in (None, bias):
            out = torch.empty(m, n, device="cuda", dtype=dtype)
            mma_gemv(x, p, b, out, MmaGemvConfig(*t))
            assert_matches(out, quant_linear_ref(x, p, b))


@pytest.mark.gpu
@requires_cuda_kernels
@pytest.mark.parametrize("m", [1, 4])
def test_gpu_gated_equals_unfused_activation(m: int) -> None:
    from rtllm.kernels.silu_and_mul import silu_and_mul

    n, k = 1024, 2048
    p = random_packed(n, k, 4, 128, "cuda", seed=7)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for t in MMA_GEMV_TILES:
        cfg = MmaGemvConfig(*t)
        full = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        mma_gemv(x, p, bias, full, cfg)
        fused = torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16)
        mma_gemv(x, p, bias, fused, cfg, gated=True)
        assert torch.equal(fused, silu_and_mul(full))


@pytest.mark.gpu
@requires_cuda_kernels
def test_gpu_tile_too_large_for_shared_memory_is_refused() -> None:
    k = 14336
    p = random_packed(64, k, 4, 128, "cuda")
    x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bytes of shared memory per CTA at K=14336, M=8"):
        mma_gemv(x, p, None, torch.empty(8, 64, device="cuda", dtype=torch.bfloat16), MmaGemvConfig(16, 32, 4))


@pytest.mark.gpu
@requires_cuda_kernels
def test_gpu_dispatch_and_graph_capture() -> None:
    n, k = 2048, 1024
    p = random_packed(n, k, 4, 128, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cfg = QuantGemmConfig(kernel="gemv_mma", chunk=8, num_warps=4, num_stages=4)
    quant_linear(x, p, None, cfg)  # compile and load before capture
    quant_linear_silu_and_mul(x, p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_linear(x, p, None, cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert_matches(out, quant_linear_ref(x, p))
    assert math.isfinite(out.float().sum().item())
