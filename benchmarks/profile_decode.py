"""Profile generation steps on the GPU: top kernels by device time.

    python benchmarks/profile_decode.py CONFIG_DIR [batch] [tokens]
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rtllm import LLM, SamplingParams


def main() -> None:
    model = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    llm = LLM(model, load_format="dummy", skip_tokenizer_init=True)
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(128)] for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    print(f"batch {batch}: {tokens} tokens in {time.perf_counter() - start:.3f} s")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    llm.shutdown()


if __name__ == "__main__":
    main()
