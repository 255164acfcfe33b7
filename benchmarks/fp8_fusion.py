"""Per-token FP8 quantization fused into RMSNorm / SiLU-mul vs the two kernels apart.

    python benchmarks/fp8_fusion.py [--rows 512,8192] [--silu-cfg BLOCK,WARPS ...]

Llama-3-8B widths (hidden 4096, intermediate 14336), bfloat16 in, median time of
``triton.testing.do_bench`` on one GPU with FP8 (compute capability >= 8.9).
"""

from __future__ import annotations

import argparse

import torch
import triton

from rtllm.kernels.fp8_linear import quantize_per_token_fp8
from rtllm.kernels.rms_norm import rms_norm
from rtllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_fp8


def _us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300) * 1e3


def measure(rows: int, hidden: int, intermediate: int, silu_cfgs: list[str]) -> None:
    """Print both comparisons for ``rows`` tokens."""
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    apart = _us(lambda: quantize_per_token_fp8(rms_norm(x, w, 1e-5, res)[0]))
    fused = _us(lambda: rms_norm(x, w, 1e-5, res, fp8_out=True))
    print(f"rows {rows:5d} rms_norm+residual -> fp8: apart {apart:8.1f} us, fused {fused:8.1f} us")
    gu = torch.randn(rows, 2 * intermediate, device="cuda", dtype=torch.bfloat16)
    apart = _us(lambda: quantize_per_token_fp8(silu_and_mul(gu)))
    plain = _us(lambda: silu_and_mul(gu))
    fused = _us(lambda: silu_and_mul_fp8(gu))
    line = f"rows {rows:5d} silu_and_mul -> fp8: apart {apart:8.1f} us (silu alone {plain:.1f}), fused {fused:8.1f} us"
    for cfg in silu_cfgs:
        block, warps = (int(v) for v in cfg.split(","))
        line += f", {block}/{warps}: {_us(lambda b=block, n=warps: silu_and_mul_fp8(gu, block=b, num_warps=n)):.1f}"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="512,8192")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--silu-cfg", nargs="*", default=[], help="BLOCK,WARPS of the fused SiLU-mul kernel")
    args = parser.parse_args()
    torch.manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        measure(rows, args.hidden, args.intermediate, args.silu_cfg)


if __name__ == "__main__":
    main()
