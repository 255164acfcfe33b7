"""Perplexity of the embedded SmolLM2-135M per quantization format (CPU or GPU).

Text: tests/data/held_out_english.txt (Coriolanus), first ``--tokens`` tokens, windows
of ``--window`` tokens (see rtllm.quantization.perplexity). "float" is the GGUF file
dequantized. Prints a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/quant_perplexity.py [--tokens 20480] [--window 1024] [--skip SQ,FP8]
        [--only AWQ] [--device cuda --dtype bfloat16] [--gptq-act-order 0|1] [--gptq-grid 0|1]
        [--fp8-weight-rounding gptq|nearest|both]

FP8 rows need a GPU with FP8 (``--device cuda``); on a CPU they run the float32
reference of the same arithmetic.

W4A16_AWQ is AWQ's scale search + GPTQ rounding and W4A16_GPTQ GPTQ rounding, both
calibrated layer by layer on ``--calib-size`` x ``--calib-max-seq-length`` tokens of
the packaged calibration text (rtllm.quantization.smoothing.calibrate_sequentially),
as are the FP8 rows with ``fp8_weight_rounding="gptq"`` (``--fp8-weight-rounding``:
the FP8 rows' weight rounding, default QuantConfig's; ``both`` prints each FP8 row
with GPTQ and with round-to-nearest weights). The FP8-vs-rounding comparison:

    python benchmarks/quant_perplexity.py --only FP8 --fp8-weight-rounding both \
        --tokens 20480 --calib-size 64 --calib-max-seq-length 512

KV-cache rows run the engine (``LLM``, paged cache, ``prompt_logprobs``) on the same
windows; their "vs float" is against the dense float row (the float-cache engine row
shows the two paths agree). The windows are prefilled in chunks of ``KV_CHUNK`` tokens:
on the GPU a prompt with no cached prefix attends over its fresh 16-bit K/V
(rtllm.kernels.prompt_attention), so only later chunks read the cache's codes; the
torch backend (CPU) reads codes in every step.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from rtllm.llmapi.tokenizer import load_tokenizer
from rtllm.models.default_model import default_model_path
from rtllm.models.loader import build_model, load_model_config
from rtllm.quantization import QuantConfig, gptq
from rtllm.quantization.perplexity import perplexity

HELD_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "held_out_english.txt")

#: Round-to-nearest int4 g64 with zero point (the grid of the two rows above, without
#: calibration): the float model with its decoder linears' weights fake-quantized.
RTN_G64 = QuantConfig(quant_algo="W4A16_AWQ", group_size=64, has_zero_point=True)
# Cheapest and most asked-for rows first: the table prints row by row.
FORMATS: list[tuple[str, QuantConfig | None]] = [
    ("float (GGUF dequantized)", None),
    ("W4A16_AWQ (g64, zero point)",
     QuantConfig(quant_algo="W4A16_AWQ", group_size=64, has_zero_point=True)),
    ("W4A16_GPTQ (GPTQ, g64, zero point)",
     QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, has_zero_point=True)),
    ("int4 g64 RTN with zero point", RTN_G64),
    ("W8A16 (int8 per channel, RTN)", QuantConfig(quant_algo="W8A16")),
    ("GGUF kept quantized (int4 g32 from Q4_1)", QuantConfig.from_gguf()),
    ("W4A16 (int4 per channel, RTN)", QuantConfig(quant_algo="W4A16")),
    ("FP8 (per tensor, dynamic acts)", QuantConfig(quant_algo="FP8")),
    ("FP8_PER_CHANNEL_PER_TOKEN", QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN")),
    ("W8A8_SQ_PER_CHANNEL (SmoothQuant 0.5)", QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL")),
]
# Group 128 does not divide SmolLM2-135M's hidden size 576: no W4A16_GPTQ / AWQ g128 row.
#: KV-cache formats, measured through the engine's paged cache (prompt_logprobs): the
#: dense forward of rtllm.quantization.perplexity has no KV cache.
KV_FORMATS = [("KV cache float (engine)", None), ("KV cache INT8 (engine)", "INT8"),
              ("KV cache FP8 (engine)", "FP8")]
#: Prefill chunk of the KV rows: a window's later chunks attend over earlier ones' codes.
KV_CHUNK = 64


def rtn_model(path: str, config: object, quant_config: QuantConfig, dtype: torch.dtype,
              device: torch.device) -> torch.nn.Module:
    """The float model with every decoder linear's weight round-to-nearest
    fake-quantized to ``quant_config``'s int4 grid (same function as quantizing it)."""
    from rtllm.layers.linear import Linear
    from rtllm.quantization.awq import fake_quantize

    model = build_model(path, config, dtype, device)
    for m in model.modules():
        if isinstance(m, Linear) and m.prefix.startswith("model.layers."):
            m.weight.data = fake_quantize(m.weight.data.float(), quant_config).to(m.weight.dtype)
    return model


def _fields(config: QuantConfig) -> dict[str, object]:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def engine_perplexity(ids: list[int], window: int, kv_algo: str | None, dtype: str,
                      device: str) -> float:
    """Perplexity through ``LLM`` with a (quantized) KV cache, windows as in
    :func:`rtllm.quantization.perplexity.perplexity`."""
    from rtllm import LLM, KvCacheConfig, SamplingParams

    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) >= 2]
    quant = None if kv_algo is None else QuantConfig(kv_cache_quant_algo=kv_algo)
    with LLM(None, dtype=dtype, device=device, quant_config=quant,
             enable_chunked_prefill=True, max_num_tokens=KV_CHUNK,
             kv_cache_config=KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.2)) as llm:
        outs = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=0),
                            use_tqdm=False)
    nll = [-pos[tok].logprob for w, o in zip(windows, outs, strict=True)
           for tok, pos in zip(w[1:], o.prompt_logprobs[1:], strict=True)]
    return math.exp(sum(nll) / len(nll))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20480, help="tokens evaluated (>= 20k)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window")
    parser.add_argument("--calib-size", type=int, default=128, help="calibration samples")
    parser.add_argument("--calib-max-seq-length", type=int, default=512, help="tokens per sample")
    parser.add_argument("--skip", default="", help="comma-separated substrings of rows to skip")
    parser.add_argument("--only", default="", help="comma-separated substrings of the rows to run")
    parser.add_argument("--gptq-act-order", type=int, choices=(0, 1), default=None,
                        help="GPTQ columns by decreasing Hessian diagonal (default: gptq.ACT_ORDER)")
    parser.add_argument("--gptq-grid", type=int, choices=(0, 1), default=None,
                        help="GPTQ grid shrink search over gptq.SHRINK_GRID (default: gptq.GRID_SHRINKS)")
    parser.add_argument("--fp8-weight-rounding", choices=("gptq", "nearest", "both"), default=None,
                        help="FP8 rows' weight rounding (default: QuantConfig's); both: two rows each")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (FP8 rows need a GPU with FP8)")
    parser.add_argument("--dtype", default="float32", help="activation dtype: float32, bfloat16")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.gptq_act_order is not None:
        gptq.ACT_ORDER = bool(args.gptq_act_order)
    if args.gptq_grid is not None:
        gptq.GRID_SHRINKS = gptq.SHRINK_GRID if args.gptq_grid else ()
    path = default_model_path()
    config = load_model_config(path)
    with open(HELD_OUT, encoding="utf-8") as f:
        ids = load_tokenizer(path)(f.read(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: args.tokens])
    roundings = {None: [None], "both": ["gptq", "nearest"]}.get(args.fp8_weight_rounding,
                                                                 [args.fp8_weight_rounding])
    rows: list[tuple[str, QuantConfig | None]] = []
    for name, quant_config in FORMATS:
        if quant_config is None or not quant_config.quant_algo.startswith("FP8"):
            rows.append((name, quant_config))
            continue
        for rounding in roundings:
            rounding = rounding or quant_config.fp8_weight_rounding
            rows.append((f"{name}, {rounding} weights",
                         QuantConfig(**{**_fields(quant_config), "fp8_weight_rounding": rounding})))
    print(f"SmolLM2-135M-Instruct, {ids.numel()} tokens of held_out_english.txt, "
          f"windows of {args.window}, {args.dtype} on {args.device}; calibration "
          f"{args.calib_size} x {args.calib_max_seq_length}, GPTQ act order {gptq.ACT_ORDER}, "
          f"grid {gptq.GRID_SHRINKS}")
    print("| format | perplexity | vs float | weight MB |")
    print("|---|---|---|---|")
    base = None
    skip = [p for p in args.skip.split(",") if p]
    only = [p for p in args.only.split(",") if p]

    def wanted(name: str) -> bool:
        return not any(p in name for p in skip) and (not only or any(p in name for p in only))
    for name, quant_config in rows:
        if quant_config is not None and not wanted(name):  # float: always (the baseline)
            continue
        if quant_config is not None and quant_config is not RTN_G64 and not quant_config.keep_gguf_quantized:
            quant_config = QuantConfig(**{
                **_fields(quant_config),
                "calib_size": args.calib_size, "calib_max_seq_length": args.calib_max_seq_length,
            })
        start = time.perf_counter()
        try:
            if quant_config is RTN_G64:
                model = rtn_model(path, config, quant_config, dtype, device)
            else:
                model = build_model(path, config, dtype, device, quant_config=quant_config)
            ppl = perplexity(model, ids, args.window)
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # one row, not the table
            print(f"| {name} | failed: {type(exc).__name__}: {exc} | | |", flush=True)
            continue
        base = base or ppl
        size = sum(p.numel() * p.dtype.itemsize for p in model.parameters()) / 1e6
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {size:.0f} |"
              f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)
    for name, kv_algo in KV_FORMATS:
        if not wanted(name):
            continue
        start = time.perf_counter()
        ppl = engine_perplexity(ids.tolist(), args.window, kv_algo, args.dtype, args.device)
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | - |"
              f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
