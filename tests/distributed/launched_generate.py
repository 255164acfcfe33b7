"""Run under ``torchrun``: every process builds the same LLM; rank 0 writes the greedy ids.

Usage: launched_generate.py MODEL_DIR OUT_JSON TP PP
"""

from __future__ import annotations

import json
import sys

from rtllm import LLM, KvCacheConfig, SamplingParams

PROMPTS = [[5, 6, 7], list(range(20, 45)), [9], list(range(100, 112))]


def main() -> None:
    model, out, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model, skip_tokenizer_init=True, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=1024))
    # Only rank 0 gets here: the other ranks follow it inside LLM(...) and exit.
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    alive = llm.executor.is_alive
    llm.shutdown()
    with open(out, "w") as f:
        json.dump({"ids": [o.outputs[0].token_ids for o in outs], "alive": alive}, f)


if __name__ == "__main__":
    main()
