"""Where FP8's perplexity loss comes from: weights, activations, or which layers.

The embedded SmolLM2-135M in float32 on the CPU, with FP8 E4M3 rounding emulated on
the decoder linears only (weights per tensor or per channel, activations per token),
on the first ``--tokens`` held-out tokens in windows of 1024:

    python benchmarks/fp8_ablation.py [--tokens 4096]
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
from rtllm.quantization import rtn
from rtllm.quantization.perplexity import perplexity

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
    args = parser.parse_args()
    path = default_model_path()
    config = load_model_config(path)
    with open(HELD_OUT, encoding="utf-8") as f:
        ids = torch.tensor(load_tokenizer(path)(f.read(), add_special_tokens=False)["input_ids"][: args.tokens])

    def run(weights: str | None, acts: str | None, keep: tuple[str, ...]) -> float:
        model = build_model(path, config, torch.float32, torch.device("cpu"))
        for m in model.modules():
            if not isinstance(m, Linear) or not m.prefix.startswith("model.layers."):
                continue
            if any(k in m.prefix for k in keep):
                continue
            if weights:
                m.weight.data = _fake_fp8_weight(m.weight.data, weights)
            if acts:
                m.register_forward_pre_hook(_fake_fp8_tokens)
        return perplexity(model, ids, 1024)

    base = run(None, None, ())
    print(f"float: {base:.3f} ({ids.numel()} tokens)")
    for weights, acts, keep in CASES:
        start = time.perf_counter()
        ppl = run(weights, acts, keep)
        print(f"weights {weights} activations {acts} 16-bit {keep or '-'}: {ppl:.3f} "
              f"({100 * (ppl / base - 1):+.2f}%, {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
