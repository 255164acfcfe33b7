"""Perplexity of the embedded SmolLM2-135M per quantization format (CPU, float32).

Text: tests/data/held_out_english.txt (Coriolanus), first ``--tokens`` tokens, windows
of ``--window`` tokens (see rtllm.quantization.perplexity). "float" is the GGUF file
dequantized. Prints a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/quant_perplexity.py [--tokens 20480] [--window 1024]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rtllm.llmapi.tokenizer import load_tokenizer
from rtllm.models.default_model import default_model_path
from rtllm.models.loader import build_model, load_model_config
from rtllm.quantization import QuantConfig
from rtllm.quantization.perplexity import perplexity

HELD_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "held_out_english.txt")

FORMATS: list[tuple[str, QuantConfig | None]] = [
    ("float (GGUF dequantized)", None),
    ("GGUF kept quantized (int4 g32 from Q4_1)", QuantConfig.from_gguf()),
    ("W8A16 (int8 per channel, RTN)", QuantConfig(quant_algo="W8A16")),
    ("W8A8_SQ_PER_CHANNEL (SmoothQuant 0.5)", QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL")),
    ("FP8 (per tensor, dynamic acts)", QuantConfig(quant_algo="FP8")),
    ("FP8_PER_CHANNEL_PER_TOKEN", QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN")),
    ("W4A16_AWQ (g64, zero point)", QuantConfig(quant_algo="W4A16_AWQ", group_size=64, has_zero_point=True)),
    ("W4A16_GPTQ layout, RTN (g64, zero point)",
     QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, has_zero_point=True)),
    ("W4A16 (int4 per channel, RTN)", QuantConfig(quant_algo="W4A16")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20480, help="tokens evaluated (>= 20k)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window")
    parser.add_argument("--calib-size", type=int, default=16, help="calibration samples")
    parser.add_argument("--calib-max-seq-length", type=int, default=256, help="tokens per sample")
    args = parser.parse_args()
    path = default_model_path()
    config = load_model_config(path)
    with open(HELD_OUT, encoding="utf-8") as f:
        ids = load_tokenizer(path)(f.read(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: args.tokens])
    print(f"SmolLM2-135M-Instruct, {ids.numel()} tokens of held_out_english.txt, "
          f"windows of {args.window}, float32 CPU")
    print("| format | perplexity | vs float | weight MB |")
    print("|---|---|---|---|")
    base = None
    for name, quant_config in FORMATS:
        if quant_config is not None and not quant_config.keep_gguf_quantized:
            quant_config = QuantConfig(**{
                **{f: getattr(quant_config, f) for f in quant_config.__dataclass_fields__},
                "calib_size": args.calib_size, "calib_max_seq_length": args.calib_max_seq_length,
            })
        start = time.perf_counter()
        model = build_model(path, config, torch.float32, torch.device("cpu"), quant_config=quant_config)
        ppl = perplexity(model, ids, args.window)
        base = base or ppl
        size = sum(p.numel() * p.dtype.itemsize for p in model.parameters()) / 1e6
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {size:.0f} |"
              f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
