"""Where FP8's perplexity loss comes from: weights, activations, or which layers.

The embedded SmolLM2-135M in float32 on the CPU, with FP8 E4M3 rounding emulated on
the decoder linears only (weights per tensor or per channel, activations per token),
on the first ``--tokens`` held-out tokens in windows of 1024:

    python benchmarks/fp8_ablation.py [--tokens 4096] [--weight-rounding nearest|gptq|both]
        [--calib-size 64 --calib-max-seq-length 512] [--cases 0,1,3]

``--weight-rounding``: FP8 weights rounded to nearest (default) or with GPTQ's error
feedback (``QuantConfig.fp8_weight_rounding="gptq"``: the float model calibrated layer
by layer on ``--calib-size`` x ``--calib-max-seq-length`` tokens of the packaged text,
rtllm.quantization.smoothing.calibrate_sequentially; activations stay float during
calibration); ``both`` runs every case with weights twice. ``--cases``: indices into
``CASES`` (default all).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rtllm.layers.linear import Linear
from rtllm.llmapi.tokenizer import load_tokenizer
from rtllm.models.default_model import default_model_path
from rtllm.models.loader import build_model, load_model_config
from rtllm.quantization import QuantConfig, rtn
from rtllm.quantization.calibration import calibration_samples
from rtllm.quantization.perplexity import perplexity
from rtllm.quantization.smoothing import calibrate_sequentially

HELD_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "held_out_english.txt")
#: (weights: None / "tensor" / "channel", activations: None / "token", linears left 16-bit)
CASES = [
    ("tensor", None, ()),
    ("channel", None, ()),
    (None, "token", ()),
    ("tensor", "token", ()),
    ("tensor", "token", ("down_proj",)),
    ("tensor", "token", ("o_proj",)),
    ("tensor", "token", ("qkv_proj",)),
    ("tensor", "token", ("gate_up_proj",)),
]


def _fake_fp8_weight(w: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "tensor":
        q, s = rtn.quantize_fp8_per_tensor(w)
    else:
        q, s = rtn.quantize_fp8_per_channel(w)
    return q.float() * s


def _fake_fp8_tokens(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
    x = args[0]
    q, s = rtn.quantize_per_token_fp8(x.reshape(-1, x.shape[-1]))
    return ((q.float() * s).reshape(x.shape),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--weight-rounding", choices=("nearest", "gptq", "both"), default="nearest")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--calib-max-seq-length", type=int, default=512)
    parser.add_argument("--cases", default="", help="comma-separated indices into CASES")
    args = parser.parse_args()
    path = default_model_path()
    config = load_model_config(path)
    with open(HELD_OUT, encoding="utf-8") as f:
        ids = torch.tensor(load_tokenizer(path)(f.read(), add_special_tokens=False)["input_ids"][: args.tokens])

    samples = calibration_samples(load_tokenizer(path), QuantConfig(
        calib_size=args.calib_size, calib_max_seq_length=args.calib_max_seq_length))

    def run(weights: str | None, acts: str | None, keep: tuple[str, ...], rounding: str) -> float:
        model = build_model(path, config, torch.float32, torch.device("cpu"))
        linears = {m.prefix: m for m in model.modules()
                   if isinstance(m, Linear) and m.prefix.startswith("model.layers.")
                   and not any(k in m.prefix for k in keep)}
        if weights and rounding == "gptq":  # weights left on their FP8 grid, RTN-exact
            algo = "FP8" if weights == "tensor" else "FP8_PER_CHANNEL_PER_TOKEN"
            calibrate_sequentially(model, QuantConfig(quant_algo=algo), samples, linears)
        for m in linears.values():
            if weights:
                m.weight.data = _fake_fp8_weight(m.weight.data, weights)
            if acts:
                m.register_forward_pre_hook(_fake_fp8_tokens)
        return perplexity(model, ids, 1024)

    base = run(None, None, (), "nearest")
    print(f"float: {base:.3f} ({ids.numel()} tokens; GPTQ calibration {len(samples)} x "
          f"{args.calib_max_seq_length} tokens)")
    picked = [int(i) for i in args.cases.split(",") if i] or range(len(CASES))
    roundings = ["nearest", "gptq"] if args.weight_rounding == "both" else [args.weight_rounding]
    for index in picked:
        weights, acts, keep = CASES[index]
        for rounding in roundings if weights else ["nearest"]:
            start = time.perf_counter()
            ppl = run(weights, acts, keep, rounding)
            label = f"weights {weights}" + (f" ({rounding})" if weights else "")
            print(f"{label} activations {acts} 16-bit {keep or '-'}: {ppl:.3f} "
                  f"({100 * (ppl / base - 1):+.2f}%, {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
