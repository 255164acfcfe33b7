"""Micro-benchmark of quantized linears at Llama-3-8B shapes (needs a CUDA GPU).

Times bf16 ``F.linear`` (cuBLAS), W8A16 (int8 per channel), W4A16 (int4, group 128,
zero points) and FP8 (per-tensor weight scale, dynamic per-token activations through
``torch._scaled_mm``) for the qkv, o, gate_up and down projections at several token
counts M. Each measurement captures ``--reps`` calls in a CUDA graph (as the engine's
decode steps run) cycling through enough weight copies to overflow L2, replays it
``--trials`` times and reports the median microseconds per call. At M = 1 it also
prints the weight bytes read per second and the sum over one decoder layer.

    PYTHONPATH=. python benchmarks/quant_gemm.py [--m 1,16,64,256] [--sweep] [--json F]

``--sweep`` first times GEMV / GEMM tile configurations (the heuristics' candidates).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from rtllm.kernels.fp8_linear import fp8_linear
from rtllm.kernels.quant_gemm import (
    PackedQuantWeight,
    QuantGemmConfig,
    prepack_int4,
    prepack_int8,
    quant_linear,
    quant_linear_ref,
)
from rtllm.quantization import rtn

SHAPES = {  # name: (K, N)
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
METHODS = ("bf16", "w8a16", "w4a16", "fp8")


def time_us(calls: list[Callable[[], object]], reps: int, trials: int) -> float:
    """Median microseconds per call of a CUDA graph holding ``reps`` calls that cycle
    through ``calls`` (one per weight copy)."""
    for c in calls:
        c()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return statistics.median(times)


def clone_packed(p: PackedQuantWeight) -> PackedQuantWeight:
    return replace(p, qweight=p.qweight.clone(), scales=p.scales.clone(), zeros=p.zeros.clone())


def make_weights(k: int, n: int) -> dict[str, tuple[object, ...]]:
    """One copy of each method's weight, quantized from one random bf16 weight."""
    w = torch.randn(n, k, device="cuda") * 0.02
    q4, s4, z4 = rtn.quantize_groupwise_asymmetric(w, 128, bits=4)
    q8, s8 = rtn.quantize_int8_per_channel(w)
    codes8 = (q8.to(torch.int16) + 128).to(torch.uint8)
    qf, sf = rtn.quantize_fp8_per_tensor(w)
    return {
        "bf16": (w.to(torch.bfloat16),),
        "w8a16": (prepack_int8(codes8, torch.full_like(s8, 128, dtype=torch.int32), s8),),
        "w4a16": (prepack_int4(q4, z4, s4, 128),),
        # Per-tensor scale broadcast to [N] once (load time): the rowwise _scaled_mm
        # path that per-token activations need takes [1, N] weight scales.
        "fp8": (qf, sf.reshape(1).expand(n).contiguous()),
    }


def weight_bytes(method: str, weights: tuple[object, ...]) -> int:
    if method in ("w8a16", "w4a16"):
        return weights[0].nbytes
    return sum(t.numel() * t.element_size() for t in weights)


def copy_weights(method: str, weights: tuple[object, ...]) -> tuple[object, ...]:
    if method in ("w8a16", "w4a16"):
        return (clone_packed(weights[0]),)
    return tuple(t.clone() for t in weights)


def make_call(
    method: str, x: torch.Tensor, weights: tuple[object, ...], cfg: QuantGemmConfig | None = None
) -> Callable[[], torch.Tensor]:
    if method == "bf16":
        return lambda: F.linear(x, weights[0])
    if method == "fp8":
        return lambda: fp8_linear(x, weights[0], weights[1])
    return lambda: quant_linear(x, weights[0], config=cfg)


def copies_for(nbytes: int, l2: int) -> int:
    return max(1, min(48, math.ceil(3 * l2 / nbytes)))


def sweep(args: argparse.Namespace, l2: int) -> None:
    gemv = [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (4, 4), (8, 4)]  # (block_n, warps)
    gemm = {
        16: [(16, 64, 4, 4, 2), (16, 128, 4, 4, 2), (16, 64, 8, 4, 2), (16, 32, 4, 2, 2)],
        64: [(64, 64, 4, 4, 2), (64, 128, 4, 4, 2), (32, 128, 4, 4, 2), (64, 128, 8, 8, 2)],
        256: [(128, 128, 4, 8, 2), (64, 128, 4, 4, 2), (128, 64, 4, 4, 2), (128, 256, 4, 8, 2)],
    }
    for name in ("o", "gate_up", "down"):
        k, n = SHAPES[name]
        base = make_weights(k, n)
        for method in ("w4a16", "w8a16"):
            wts = [base[method]]
            wts += [
                copy_weights(method, wts[0]) for _ in range(copies_for(wts[0][0].nbytes, l2) - 1)
            ]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            res = []
            for bn, warps in gemv:
                cfg = QuantGemmConfig(kernel="gemv", block_n=bn, num_warps=warps, chunk=32 * warps)
                us = time_us([make_call(method, x, w, cfg) for w in wts], args.reps, args.trials)
                res.append((us, f"gemv bn={bn} w={warps}"))
            print(f"sweep {name:8s} {method} M=1: " + ", ".join(f"{c} {u:.1f}" for u, c in res))
            if method != "w4a16" or name == "down" or not args.sweep_gemm:
                continue
            for m, cands in gemm.items():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                res = []
                for bm, bn, chunk, warps, stages in cands:
                    cfg = QuantGemmConfig("gemm", bm, bn, chunk, None, warps, stages)
                    us = time_us(
                        [make_call(method, x, w, cfg) for w in wts], args.reps, args.trials
                    )
                    res.append((us, f"{bm}x{bn}c{chunk}w{warps}"))
                print(
                    f"sweep {name:8s} {method} M={m}: " + ", ".join(f"{c} {u:.1f}" for u, c in res)
                )
        del base
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", default="1,16,64,256", help="token counts")
    parser.add_argument("--reps", type=int, default=50, help="calls per CUDA graph")
    parser.add_argument("--trials", type=int, default=15, help="graph replays timed")
    parser.add_argument("--sweep", action="store_true", help="time tile configurations first")
    parser.add_argument("--sweep-gemm", action="store_true", help="with --sweep: GEMM tiles too")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, "
        f"torch {torch.__version__}"
    )
    if args.sweep:
        sweep(args, l2)
    ms = [int(v) for v in args.m.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    for name, (k, n) in SHAPES.items():
        base = make_weights(k, n)
        results[name], nbytes[name] = {}, {}
        copies = {}
        for method in METHODS:
            nb = weight_bytes(method, base[method])
            nbytes[name][method] = nb
            copies[method] = [base[method]] + [
                copy_weights(method, base[method]) for _ in range(copies_for(nb, l2) - 1)
            ]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {}
            for method in METHODS:
                calls = [make_call(method, x, w) for w in copies[method]]
                row[method] = time_us(calls, args.reps, args.trials)
            # Sanity: the quantized kernels against their dequantize reference.
            for method in ("w8a16", "w4a16"):
                p = base[method][0]
                ref = quant_linear_ref(x, p).float()
                err = ((quant_linear(x, p).float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, f"{name} M={m} {method}: normalized error {err:.2e}"
            results[name][m] = row
            print(f"{name:8s} M={m:4d} " + " ".join(f"{k_}={v:8.1f}us" for k_, v in row.items()))
        del base, copies
        torch.cuda.empty_cache()

    hdr = f"{'shape':8s} {'K->N':>12s} {'M':>4s} " + "".join(f"{m:>10s}" for m in METHODS)
    hdr += "  speedup vs bf16 (w8 / w4 / fp8)"
    print("\nmicroseconds per call (median; CUDA graph replays, weights rotated past L2)")
    print(hdr)
    for name, (k, n) in SHAPES.items():
        for m in ms:
            row = results[name][m]
            sp = " / ".join(f"{row['bf16'] / row[x]:.2f}x" for x in ("w8a16", "w4a16", "fp8"))
            cells = "".join(f"{row[x]:10.1f}" for x in METHODS)
            print(f"{name:8s} {f'{k}->{n}':>12s} {m:4d} {cells}  {sp}")
    if 1 in ms:
        print("\nM=1 weight bandwidth (weight bytes / time, TB/s)")
        for name in SHAPES:
            row = results[name][1]
            print(
                f"{name:8s} "
                + "".join(f"{x}={nbytes[name][x] / row[x] / 1e6:6.2f}  " for x in METHODS)
            )
        print("\nM=1, one decoder layer (qkv + o + gate_up + down)")
        tot = {x: sum(results[s][1][x] for s in SHAPES) for x in METHODS}
        print("  ".join(f"{x}={tot[x]:.1f}us ({tot['bf16'] / tot[x]:.2f}x)" for x in METHODS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "results": results, "bytes": nbytes}, f, indent=1)


if __name__ == "__main__":
    main()
