"""Profile generation on the GPU: top kernels by device time.

    python benchmarks/profile_decode.py CONFIG_DIR [--batch 1] [--input-len 128]
        [--output-len 64] [--quant-algo W4A16_GPTQ] [--kv-cache-quant-algo FP8]
        [--quant-group-size 128] [--rows 25]

Runs the workload twice (warm-up: CUDA graphs, kernel tuning), times the second run,
then profiles a third. Each run has prompts of its own, so no run hits the prefix
cache of an earlier one (as in ``rtllm bench throughput``). With ``--output-len 1`` the
profile is the prefill alone.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rtllm import LLM, SamplingParams
from rtllm.llmapi.llm_args import CudaGraphConfig
from rtllm.quantization import QuantConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--quant-algo", default=None)
    parser.add_argument("--kv-cache-quant-algo", default=None)
    parser.add_argument("--quant-group-size", type=int, default=128)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    quant = None
    if args.quant_algo or args.kv_cache_quant_algo:
        quant = QuantConfig(quant_algo=args.quant_algo or "NO_QUANT",
                            kv_cache_quant_algo=args.kv_cache_quant_algo,
                            group_size=args.quant_group_size)
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, quant_config=quant,
              max_batch_size=max(8, args.batch),
              cuda_graph_config=CudaGraphConfig(max_batch_size=max(8, args.batch)))

    def prompts(run: int) -> list[list[int]]:
        rng = random.Random(run)
        return [[rng.randrange(10, 30000) for _ in range(args.input_len)] for _ in range(args.batch)]

    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts(0), params, use_tqdm=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts(1), params, use_tqdm=False)
    torch.cuda.synchronize()
    print(f"batch {args.batch} x ({args.input_len} in, {args.output_len} out): "
          f"{time.perf_counter() - start:.3f} s, quant {args.quant_algo} kv {args.kv_cache_quant_algo}")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        llm.generate(prompts(2), params, use_tqdm=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=90))
    llm.shutdown()


if __name__ == "__main__":
    main()
