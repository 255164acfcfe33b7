"""Sweep of the tensor-core int4 GEMV's tiles at Llama-3-8B shapes (needs CUDA and NVRTC).

For each projection (qkv, o, gate_up, down) at ``--m`` rows, int4 group 128, times the
tuned ``quant_linear`` (the tuner's pick among the Triton and CUDA kernels) and the
CUDA kernel (:mod:`rtllm.kernels.quant_gemv_mma`) at every ``(warps, blocks per step,
stages)`` tile given, each as a CUDA graph of back-to-back calls over weight copies
that overflow L2 (:func:`rtllm.kernels.graph_timing.graph_time_us`), and prints us per
call, TB/s of packed weight, and the sum over 32 layers.

    PYTHONPATH=. python benchmarks/gemv_mma_sweep.py [--m 1] [--tiles 8,32,2 4,16,3 ...]
"""

from __future__ import annotations

import argparse

import torch

from rtllm.kernels import quant_gemm as qg
from rtllm.kernels.graph_timing import graph_time_us, l2_overflow_copies
from rtllm.kernels.quant_gemv_mma import MmaGemvConfig, mma_gemv
from rtllm.kernels.quant_tuning import MMA_GEMV_TILES
from rtllm.quantization import rtn

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
LAYERS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=1, help="rows of x (1..8)")
    parser.add_argument("--tiles", nargs="*", default=None, help="warps,blocks,stages ...")
    parser.add_argument("--reps", type=int, default=64, help="calls per CUDA graph")
    parser.add_argument("--trials", type=int, default=7, help="graph replays (median)")
    args = parser.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else list(MMA_GEMV_TILES)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, M = {args.m}, int4 g128")
    sums: dict[str, float] = {}
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        q, s, z = rtn.quantize_groupwise_asymmetric(w, 128, bits=4)
        packed = qg.prepack_int4(q, z, s, 128)
        copies = [packed] + [packed.clone() for _ in range(l2_overflow_copies(packed.nbytes, w.device) - 1)]
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(args.m, n, device="cuda", dtype=torch.bfloat16)
        tuned = [lambda p=p, x=x: qg.quant_linear(x, p) for p in copies]
        times = {"tuned": graph_time_us(tuned, args.reps, args.trials)}
        for t in tiles:
            cfg = MmaGemvConfig(*t)
            calls = [lambda p=p, c=cfg, x=x, o=out: mma_gemv(x, p, None, o, c) for p in copies]
            try:
                times[str(t)] = graph_time_us(calls, args.reps, args.trials)
            except ValueError as err:  # the tile does not fit this shape
                print(f"{name:8s} {t}: {err}")
                times[str(t)] = float("inf")
        line = "  ".join(f"{key} {us:.2f} us {packed.nbytes / us / 1e6:.2f} TB/s" for key, us in times.items())
        print(f"{name:8s} {line}", flush=True)
        for key, us in times.items():
            sums[key] = sums.get(key, 0.0) + LAYERS * us
    for key, us in sums.items():
        print(f"sum x {LAYERS} layers, {key}: {us:,.0f} us")


if __name__ == "__main__":
    main()
