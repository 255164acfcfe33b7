"""Cost of mixed sampling parameters in one batch versus an all-greedy batch.

    python benchmarks/mixed_sampling.py CONFIG_DIR [batch] [tokens] [--profile]

Runs the same prompts three times on one LLM (dummy weights): all greedy; mixed
sampling without token-history features (temperature, top-k, top-p, min-p, seeds,
logprobs, bad token ids); mixed including penalties (repetition / presence /
frequency, n-gram bans). Reports the mean latency of generation-only steps from the
engine's iteration stats, and each mixed batch's cost relative to greedy.
"""

from __future__ import annotations

import json
import statistics
import sys

from rtllm import LLM, SamplingParams


def params_for(kind: str, batch: int, tokens: int) -> list[SamplingParams]:
    out = []
    for i in range(batch):
        base = {"max_tokens": tokens, "ignore_eos": True}
        if kind == "greedy":
            out.append(SamplingParams(temperature=0, **base))
            continue
        choice = i % 4
        if choice == 0:
            out.append(SamplingParams(temperature=0, **base))
        elif choice == 1:
            out.append(SamplingParams(temperature=0.8, top_p=0.9, seed=i, **base))
        elif choice == 2:
            out.append(SamplingParams(temperature=1.0, top_k=50, min_p=0.05, logprobs=2, **base))
        else:
            extra = {"repetition_penalty": 1.1, "presence_penalty": 0.5} if kind == "penalties" else {}
            out.append(SamplingParams(temperature=0.7, bad_token_ids=[11, 12], **extra, **base))
    return out


def generation_step_ms(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    llm.get_stats(timeout=0)  # drop what earlier runs left
    llm.generate(prompts, params, use_tqdm=False)
    stats = llm.get_stats(timeout=1)
    steps = [s["iterLatencyMS"] for s in stats if s["inflightBatchingStats"]["numContextRequests"] == 0
             and s["inflightBatchingStats"]["numGenRequests"] == len(prompts)]
    return statistics.median(steps)


def main() -> None:
    model = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    llm = LLM(model, load_format="dummy", skip_tokenizer_init=True, enable_iter_perf_stats=True,
              iter_stats_max_iterations=10000)
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(128)] for i in range(batch)]
    generation_step_ms(llm, prompts, params_for("greedy", batch, 16))  # warm-up
    results = {}
    for kind in ("greedy", "mixed", "penalties", "greedy"):
        results[kind] = generation_step_ms(llm, prompts, params_for(kind, batch, tokens))
    report = {
        "model": model, "batch": batch, "tokens": tokens,
        "median_generation_step_ms": results,
        "mixed_vs_greedy": results["mixed"] / results["greedy"],
        "penalties_vs_greedy": results["penalties"] / results["greedy"],
    }
    print(json.dumps(report, indent=2))
    if "--profile" in sys.argv:
        profile_kind(llm, prompts, params_for("mixed", batch, 32))
    llm.shutdown()


def profile_kind(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """Top device kernels and host functions of a mixed batch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
