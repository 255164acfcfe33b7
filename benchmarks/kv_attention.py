"""Micro-benchmark of the paged attention kernels per KV-cache dtype (needs a CUDA GPU).

Times :func:`rtllm.kernels.decode_attention.decode_attention` (one new token per
sequence) and :func:`rtllm.kernels.context_attention.context_attention` (whole prompts)
at Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, 32-token
blocks) over a bf16, FP8 E4M3 or INT8 cache, and reports the median time of one call
and the bytes of K/V (codes plus scales) read per second. Each configuration is also
checked against the bf16 run on the same (dequantized) cache.

    PYTHONPATH=. python benchmarks/kv_attention.py [--batch 256] [--ctx 256,512]
        [--kv bf16,fp8,int8] [--decode-cfg W,S,BN ...] [--context-cfg W,S,BM,BN ...]

``--decode-cfg`` / ``--context-cfg`` add tuning overrides (num_warps, num_stages,
block sizes) to sweep beside the defaults.
"""

from __future__ import annotations

import argparse

import torch
import triton

from rtllm.kernels.context_attention import context_attention
from rtllm.kernels.decode_attention import decode_attention
from rtllm.kernels.kv_quant import quantize_kv_cache

HEADS, KV_HEADS, HEAD_DIM, TOKENS_PER_BLOCK = 32, 8, 128, 32
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def paged_cache(seq_lens: list[int], kv: str, gen: torch.Generator) -> tuple:
    """A shuffled paged cache holding every sequence's keys: (cache, scale, tables, kv bytes)."""
    counts = [-(-s // TOKENS_PER_BLOCK) for s in seq_lens]
    num_blocks = sum(counts)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(counts)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(counts):
        tables[i, :n] = perm[used : used + n]
        used += n
    shape = (2, num_blocks, TOKENS_PER_BLOCK, KV_HEADS, HEAD_DIM)
    cache = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    tokens = sum(seq_lens)
    if kv == "bf16":
        return cache, None, tables.cuda(), tokens * KV_HEADS * HEAD_DIM * 2 * 2
    codes, scale = quantize_kv_cache(cache, KV_DTYPES[kv])
    return codes, scale, tables.cuda(), tokens * KV_HEADS * (HEAD_DIM + 4) * 2


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_decode(seq_lens, kv, cfg, gen) -> tuple[float, float, torch.Tensor]:
    cache, scale, tables, nbytes = paged_cache(seq_lens, kv, torch.Generator().manual_seed(1))
    query = torch.randn(len(seq_lens), HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    kw = {"kv_scale": scale, "max_seq_len": max(seq_lens)}
    if cfg:
        kw.update(num_warps=cfg[0], num_stages=cfg[1], block_n=cfg[2])
        if len(cfg) > 3:
            kw["num_splits"] = cfg[3]

    def call() -> torch.Tensor:
        return decode_attention(query, cache, lens, tables, HEAD_DIM**-0.5, **kw)

    out = call()
    ms = time_ms(call)
    return ms, nbytes / ms / 1e6, out


def bench_context(seq_lens, kv, cfg, gen) -> tuple[float, float, torch.Tensor]:
    cache, scale, tables, nbytes = paged_cache(seq_lens, kv, torch.Generator().manual_seed(1))
    query = torch.randn(sum(seq_lens), HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    kw = {"kv_scale": scale}
    if cfg:
        kw.update(num_warps=cfg[0], num_stages=cfg[1], block_m=cfg[2], block_n=cfg[3])

    def call() -> torch.Tensor:
        return context_attention(
            query, cache, cu, lens, tables, max(seq_lens), HEAD_DIM**-0.5, **kw
        )

    out = call()
    ms = time_ms(call)
    return ms, nbytes / ms / 1e6, out


def parse_cfgs(values: list[str]) -> list[tuple[int, ...] | None]:
    return [None] + [tuple(int(x) for x in v.split(",")) for v in values]


def sweep(bench, seq_lens: list[int], kvs: list[str], cfgs: list[str]) -> None:
    """Time ``bench`` for each KV dtype x configuration; print time, K/V bytes per
    second, and speed and relative error against the first row (the first dtype)."""
    base = None
    for kv in kvs:
        for cfg in parse_cfgs(cfgs):
            ms, gbs, out = bench(seq_lens, kv, cfg, torch.Generator().manual_seed(2))
            if base is None:
                base = (ms, out, kv)
            err = ((out.float() - base[1].float()).norm() / base[1].float().norm()).item()
            print(
                f"  {kv:5s} cfg {cfg or 'default'!s:14s} {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s"
                f"  x{base[0] / ms:5.2f} vs {base[2]}  rel err {err:.1e}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ctx", default="256,512", help="context lengths drawn uniformly in LO,HI")
    p.add_argument("--context-batch", type=int, default=16)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--kv", default="bf16,fp8,int8")
    p.add_argument("--decode-cfg", nargs="*", default=[], help="W,S,BLOCK_N[,SPLITS]")
    p.add_argument("--context-cfg", nargs="*", default=[], help="W,S,BLOCK_M,BLOCK_N")
    p.add_argument("--skip-context", action="store_true")
    args = p.parse_args()
    lo, hi = (int(x) for x in args.ctx.split(","))
    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(lo, hi + 1, (args.batch,), generator=gen).tolist()
    kvs = args.kv.split(",")
    print(f"decode: batch {args.batch}, context {lo}-{hi} ({sum(seq_lens)} keys)")
    sweep(bench_decode, seq_lens, kvs, args.decode_cfg)
    if not args.skip_context:
        print(f"context: {args.context_batch} prompts of {args.context_len} tokens")
        sweep(bench_context, [args.context_len] * args.context_batch, kvs, args.context_cfg)


if __name__ == "__main__":
    main()
