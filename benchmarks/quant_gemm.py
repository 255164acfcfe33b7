"""Micro-benchmark of weight-only quantized linears at Llama-3-8B shapes (needs a CUDA GPU).

Times, for the qkv (6144x4096), o (4096x4096), gate_up (28672x4096) and down
(4096x14336) projections at token counts M (default 1, 4, 16, 64):

* ``bf16``: cuBLAS ``F.linear`` on the bfloat16 weight;
* ``w8a16`` / ``w4a16``: :func:`rtllm.kernels.quant_gemm.quant_linear` as the engine
  runs it (tuned per shape on first call), int8 per channel / int4 group 128 with
  zero points;
(The kernels before the rewrite were compared in the same script at commit
``9fd82de``; their figures are in ``benchmarks/RESULTS.md``.)
* ``w8a16_deq`` / ``w4a16_deq``: dequantize into a bf16 scratch then cuBLAS, for
  ``M >= --deq-min-m`` (default 16; it only has a chance where the GEMM is
  compute-bound).

Each measurement captures ``--reps`` calls in a CUDA graph (as the engine's decode
steps run) cycling through enough weight copies to overflow L2, replays it
``--trials`` times and reports the median microseconds per call, plus the effective
weight bandwidth (bytes of codes, scales and zeros, or bf16 weight, per second). It
then sums each method over the 4 shapes x 32 layers (one decode step's linears,
lm_head excluded), prints the tuner's choice and candidate timings, and writes
everything to ``--out`` (JSON). ``--budget-s`` stops starting new cells past that
many seconds (the rest are reported as skipped), so the run always ends.

    PYTHONPATH=. python benchmarks/quant_gemm.py [--quick] [--m 1,4,16,64] --out F.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from rtllm.kernels import quant_gemm as qg  # noqa: E402
from rtllm.kernels.graph_timing import graph_time_us, l2_overflow_copies  # noqa: E402
from rtllm.quantization import rtn  # noqa: E402

SHAPES = {  # name: (K, N)
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
LAYERS = 32
FORMATS = ("w8a16", "w4a16")
DEVICE = "cuda"


def smoke_setup() -> None:
    """``--smoke``: tiny shapes on the CPU (Triton interpreter) with a wall-clock timer,
    to check this script's plumbing without a GPU; the numbers mean nothing."""
    global DEVICE
    DEVICE = "cpu"
    from rtllm.kernels.interpreter import patch_triton_interpreter

    patch_triton_interpreter()
    for name in SHAPES:
        SHAPES[name] = (256, 96) if name != "down" else (512, 64)


def time_us(calls: list[Callable[[], object]], reps: int, trials: int) -> float:
    """Median microseconds per call (``--smoke``: a wall-clock loop on the CPU)."""
    if DEVICE == "cpu":
        for c in calls:
            c()
        start = time.perf_counter()
        for i in range(reps):
            calls[i % len(calls)]()
        return (time.perf_counter() - start) * 1e6 / reps
    return graph_time_us(calls, reps, trials)


def make_weights(k: int, n: int, dtype: torch.dtype) -> dict[str, object]:
    """One weight per format, quantized from one random bf16 weight."""
    w = torch.randn(n, k, device=DEVICE) * 0.02
    q4, s4, z4 = rtn.quantize_groupwise_asymmetric(w, 128, bits=4)
    q8, s8 = rtn.quantize_int8_per_channel(w)
    codes8 = (q8.to(torch.int16) + 128).to(torch.uint8)
    zeros8 = torch.full_like(s8, 128, dtype=torch.int32)
    return {
        "bf16": w.to(dtype),
        "w8a16": qg.prepack_int8(codes8, zeros8, s8),
        "w4a16": qg.prepack_int4(q4, z4, s4, 128),
    }


def nbytes(w: object) -> int:
    return w.nbytes if isinstance(w, qg.PackedQuantWeight) else w.numel() * w.element_size()


def method_call(method: str, x: torch.Tensor, w: object) -> Callable[[], torch.Tensor]:
    if method == "bf16":
        return lambda: F.linear(x, w)
    if method.endswith("_deq"):
        cfg = qg.QuantGemmConfig(kernel="dequant")
        return lambda: qg.quant_linear(x, w, None, cfg)
    return lambda: qg.quant_linear(x, w)


def methods_for(m: int, args: argparse.Namespace) -> list[str]:
    out = ["bf16", *FORMATS]
    if m >= args.deq_min_m:
        out += [f"{f}_deq" for f in FORMATS]
    return out


def config_str(x: torch.Tensor, w: qg.PackedQuantWeight) -> str:
    """The tuner's choice for this call (after it ran), compactly."""
    m = x.shape[0]
    for key, cfg in qg.tuned_configs().items():
        if key[2:7] == (qg_bucket(m), w.out_features, w.in_features, w.bits, w.group_size):
            return cfg_str(cfg)
    return "default"


def cfg_str(cfg: qg.QuantGemmConfig) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if v is not None and k != "kernel"}
    short = {"block_m": "bm", "block_n": "bn", "chunk": "c", "split_k": "sk", "num_warps": "w"}
    return f"{cfg.kernel}(" + ",".join(f"{short.get(k, k)}={v}" for k, v in fields.items()) + ")"


def qg_bucket(m: int) -> int:
    from rtllm.kernels.quant_tuning import _m_bucket

    return _m_bucket(m)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", default=None, help="token counts (default 1,4,16,64)")
    parser.add_argument("--quick", action="store_true", help="M = 1,16, fewer repeats")
    parser.add_argument("--reps", type=int, default=None, help="calls per CUDA graph")
    parser.add_argument("--trials", type=int, default=None, help="graph replays timed")
    parser.add_argument("--deq-min-m", type=int, default=16, help="time dequant+cuBLAS from M")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no cell after")
    parser.add_argument("--out", "--json", dest="out", default=None, help="write JSON here")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        smoke_setup()
    dtype = torch.float16 if args.smoke else torch.bfloat16
    ms = [int(v) for v in (args.m or ("1,16" if args.quick else "1,4,16,64")).split(",")]
    reps = args.reps or (20 if args.quick else 50)
    trials = args.trials or (5 if args.quick else 15)
    t0 = time.perf_counter()
    if DEVICE == "cpu":
        device_name, l2 = "cpu (--smoke, Triton interpreter)", 1
    else:
        props = torch.cuda.get_device_properties(0)
        device_name, l2 = props.name, props.L2_cache_size
        print(f"{props.multi_processor_count} SMs, L2 {l2 >> 20} MiB", end=", ")
    print(f"device: {device_name}, torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)
    weights, copies = {}, {}
    for name, (k, n) in SHAPES.items():
        weights[name] = make_weights(k, n, dtype)
        copies[name] = {}
        for fmt, w in weights[name].items():
            count = l2_overflow_copies(nbytes(w), torch.device(DEVICE))
            copies[name][fmt] = [w] + [w.clone() for _ in range(count - 1)]
    rows: list[dict[str, object]] = []
    for m in ms:  # M = 1 first: the decode numbers matter most if the budget runs out
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device=DEVICE, dtype=dtype)
            refs: dict[str, torch.Tensor] = {}
            for method in methods_for(m, args):
                fmt = method.split("_")[0]
                row = {"shape": name, "k": k, "n": n, "m": m, "method": method}
                if time.perf_counter() - t0 > args.budget_s:
                    rows.append({**row, "skipped": True})
                    continue
                ws = copies[name][fmt]
                try:
                    us = time_us([method_call(method, x, w) for w in ws], reps, trials)
                except Exception as exc:  # noqa: BLE001 (report, keep going)
                    rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    print(f"{name} M={m} {method}: FAILED {exc}", flush=True)
                    continue
                row.update(us=us, gbps=nbytes(ws[0]) / us / 1e3, bytes=nbytes(ws[0]))
                if fmt != "bf16":
                    out = method_call(method, x, ws[0])()
                    if fmt not in refs:  # current layout; once per (shape, M, format)
                        refs[fmt] = qg.quant_linear_ref(x, copies[name][fmt][0])
                    row["rel_err"] = rel_err(out, refs[fmt])
                    if method == fmt:
                        row["config"] = config_str(x, ws[0])
                rows.append(row)
            done = [r for r in rows if r["m"] == m and r["shape"] == name and "us" in r]
            print(
                f"{name:8s} M={m:3d} "
                + " ".join(f"{r['method']}={r['us']:.1f}us" for r in done)
                + f"  [{time.perf_counter() - t0:.0f}s]",
                flush=True,
            )
    report(rows, ms, args)
    if args.out:
        timings = [
            {
                "key": [str(v) for v in key],
                "candidates": [
                    {"config": asdict(c), "ms": t if math.isfinite(t) else None} for c, t in cands
                ],
            }
            for key, cands in qg.tuning_timings().items()
        ]
        doc = {
            "device": device_name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "layers": LAYERS,
            "rows": rows,
            "e2e_us": e2e(rows, ms),
            "tuning": timings,
            "seconds": time.perf_counter() - t0,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")


def e2e(rows: list[dict[str, object]], ms: list[int]) -> dict[str, dict[str, float]]:
    """Per M and method: LAYERS x the sum over the 4 shapes (only if all 4 were timed)."""
    out: dict[str, dict[str, float]] = {}
    for m in ms:
        per: dict[str, list[float]] = {}
        for r in rows:
            if r["m"] == m and "us" in r:
                per.setdefault(r["method"], []).append(r["us"])
        out[str(m)] = {k: LAYERS * sum(v) for k, v in per.items() if len(v) == len(SHAPES)}
    return out


def report(rows: list[dict[str, object]], ms: list[int], args: argparse.Namespace) -> None:
    by = {(r["shape"], r["m"], r["method"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print("\nus per call (median, CUDA graph, weights rotated past L2) | weight GB/s")
    print(f"{'shape':8s} {'M':>3s} " + "".join(f"{x:>17s}" for x in methods) + "  w8/bf16 w4/bf16")
    for m in ms:
        for name in SHAPES:
            cells = []
            for meth in methods:
                r = by.get((name, m, meth), {})
                cell = f"{r['us']:7.1f}|{r['gbps']:6.0f}" if "us" in r else "    -"
                cells.append(f"{cell:>17s}")
            sp = []
            for fmt in FORMATS:
                b, q = by.get((name, m, "bf16"), {}), by.get((name, m, fmt), {})
                sp.append(f"{b['us'] / q['us']:6.2f}x" if "us" in b and "us" in q else "     -")
            print(f"{name:8s} {m:3d} " + "".join(cells) + "  " + " ".join(sp))
    print(f"\n{LAYERS} layers x (qkv + o + gate_up + down), us per decode step (lm_head excluded)")
    for m, per in e2e(rows, ms).items():
        base = per.get("bf16")
        cells = [f"{k}={v:.0f}" + (f" ({base / v:.2f}x)" if base else "") for k, v in per.items()]
        print(f"M={m:>3s}: " + "  ".join(cells))
    print("\ntuned choices (new kernels) and rel. error vs dequantized reference")
    for r in rows:
        if "config" in r:
            print(
                f"{r['shape']:8s} M={r['m']:3d} {r['method']:6s} {r['config']}"
                f"  err={r['rel_err']:.1e}"
            )
    print("\ntuner timings, M <= 4 (us per call in a CUDA graph, L2 overflowed; the winner first)")
    for key, cands in qg.tuning_timings().items():
        if key[2] > 4:
            continue
        ranked = sorted(cands, key=lambda ct: ct[1])
        cells = [f"{cfg_str(c)}={t * 1e3:.1f}" for c, t in ranked if math.isfinite(t)]
        print(f"M={key[2]} N={key[3]} K={key[4]} bits={key[5]}: " + ", ".join(cells))
    bad = [r for r in rows if r.get("rel_err", 0.0) > 1e-2 or "error" in r]
    for r in bad:
        print(f"CHECK: {r['shape']} M={r['m']} {r['method']}: {r.get('error', r.get('rel_err'))}")
    skipped = sum(1 for r in rows if r.get("skipped"))
    if skipped:
        print(f"budget ({args.budget_s:.0f}s) reached: {skipped} cells skipped")


if __name__ == "__main__":
    main()
