"""``rtllm quantize``: write a quantized checkpoint that ``LLM(model=DIR)`` loads."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rtllm.quantization.config import QuantConfig
from rtllm.quantization.export import KV_CACHE_DTYPES, QFORMATS


def add_quantize_parser(sub: Any) -> None:
    """Register the ``quantize`` sub-command on ``sub`` (argparse sub-parsers)."""
    defaults = QuantConfig()
    p = sub.add_parser(
        "quantize",
        help="write a quantized checkpoint (AWQ, GPTQ, FP8, SmoothQuant)",
        description="Quantize a float model (Hugging Face directory or .gguf file) into a "
        "Hugging Face-style directory that `LLM(model=DIR)` loads without further flags.",
    )
    p.add_argument("--model", default=None,
                   help="source model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--qformat", required=True, choices=list(QFORMATS),
                   help="w4a16_awq: AWQ GEMM int4 (calibrated); w4a16: int4 per channel (GPTQ "
                   "layout); w8a16: int8 per channel (GPTQ layout); fp8: HF FP8 per tensor (GPTQ-rounded, "
                   "calibrated, by default); "
                   "w8a8_sq: SmoothQuant (rtllm format, calibrated)")
    p.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                   help="record a KV-cache type in quantization_config")
    p.add_argument("--group-size", type=int, default=None,
                   help="w4a16_awq group size, 64 or 128 (default: 128, or 64 when 128 does not "
                   "divide every layer)")
    p.add_argument("--fp8-weight-rounding", default=None, choices=["gptq", "nearest"],
                   help="fp8: round the weights with GPTQ on calibration data (default "
                   f"{defaults.fp8_weight_rounding!r}) or to nearest (no calibration)")
    p.add_argument("--calib-size", type=int, default=None,
                   help=f"calibration samples (default {defaults.calib_size}, "
                   "capped by the text's length)")
    p.add_argument("--calib-max-seq-length", type=int, default=None,
                   help=f"tokens per calibration sample (default {defaults.calib_max_seq_length})")
    p.add_argument("--calib-dataset", default=None,
                   help="calibration text file (default: a packaged public-domain English text)")
    p.add_argument("--output", required=True, help="output directory (new or empty)")
    p.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from rtllm.llmapi.build import resolve_model_path
    from rtllm.quantization.export import export_config, quantize_checkpoint

    config = export_config(
        args.qformat,
        args.kv_cache_dtype,
        args.group_size,
        args.fp8_weight_rounding,
        calib_size=args.calib_size,
        calib_max_seq_length=args.calib_max_seq_length,
        calib_dataset=args.calib_dataset,
    )
    start = time.perf_counter()
    written = quantize_checkpoint(
        resolve_model_path(args.model), args.output, config, args.group_size is not None
    )
    method = written.to_checkpoint_quantization_config()["quant_method"]
    print(f"wrote {args.output} ({written.quant_algo}, quant_method {method}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
