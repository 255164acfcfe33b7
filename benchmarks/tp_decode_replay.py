"""Pure GPU time of one batch-1 decode step (CUDA-graph replay) at TP=1 or TP=N.

Separates the kernels and collectives of a tensor-parallel decode step from the engine
loop around it: each rank builds its shard, fills the graph inputs for one sequence of
``--context`` tokens once, then replays the batch-1 graph ``--iters`` times (ranks stay
in lockstep through the all-reduces inside the graph).

  python benchmarks/tp_decode_replay.py --model benchmarks/configs/llama3-8b
  torchrun --standalone --nproc-per-node 2 benchmarks/tp_decode_replay.py --model ... --tp 2

(The TP=2 form hung once on two H200s before printing anything; see RESULTS.md.)

``--leave-out KIND`` replaces one kind of work with a no-op before the graph is captured
(timing only: the outputs are meaningless), so the step time it saves is that work's
cost on the step's critical path, overlap under PDL included, which kernel timings
cannot show: ``norm`` (RMSNorm and its residual add), ``rotary``, ``kv_write``,
``attention`` (decode attention), ``o_proj`` (identity: its input and output sizes
match).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from rtllm.distributed import parallel_state as ps
from rtllm.distributed.mapping import Mapping
from rtllm.layers.attention_backends import StepAttentionInputs
from rtllm.llmapi.build import build_engine
from rtllm.llmapi.llm_args import CudaGraphConfig, KvCacheConfig, LlmArgs
from rtllm.runtime.model_runner import StepInputs

LEAVE_OUT = ("norm", "rotary", "kv_write", "attention", "o_proj")


def leave_out(kind: str) -> None:
    """Patch ``kind`` (one of ``LEAVE_OUT``) into a no-op for this process."""
    from rtllm.layers import norm, rotary
    from rtllm.layers.attention_backends import triton_backend
    from rtllm.models import llama

    if kind == "norm":
        norm.RMSNorm.forward = lambda self, x, residual=None, fp8_out=False: (
            x if residual is None else (x, residual)
        )
    elif kind == "rotary":
        rotary.RotaryEmbedding.forward = lambda self, positions, q, k: (q, k)
    elif kind == "kv_write":
        triton_backend.write_kv_cache = lambda *args, **kwargs: None
    elif kind == "attention":
        triton_backend.decode_attention = lambda query, *args, **kwargs: query
    elif kind == "o_proj":
        attend = llama.LlamaAttention.forward

        def without_o_proj(self: llama.LlamaAttention, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            object.__setattr__(self, "o_proj", lambda x: x)  # shadows the submodule
            try:
                return attend(self, positions, hidden)
            finally:
                del self.__dict__["o_proj"]

        llama.LlamaAttention.forward = without_o_proj
    else:
        raise ValueError(f"--leave-out must be one of {', '.join(LEAVE_OUT)}, got {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="print rank 0's kernel time table")
    parser.add_argument("--quant-algo", default=None, help="quantize the weights on load (e.g. W4A16_GPTQ)")
    parser.add_argument("--quant-group-size", type=int, default=None, help="group size of --quant-algo")
    parser.add_argument("--rows", type=int, default=18, help="kernels in the --profile table")
    parser.add_argument("--leave-out", choices=LEAVE_OUT, default=None, help="time the step without this work")
    args = parser.parse_args()
    if args.leave_out is not None:
        leave_out(args.leave_out)
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if args.tp > 1:
        ps.init_distributed(Mapping(args.tp, rank, args.tp, 1), device, "env://")
    quant = {}
    if args.quant_algo is not None:
        from rtllm.quantization import QuantConfig

        group = {} if args.quant_group_size is None else {"group_size": args.quant_group_size}
        quant["quant_config"] = QuantConfig(quant_algo=args.quant_algo, **group)
    llm_args = LlmArgs(
        model=args.model, load_format="dummy", skip_tokenizer_init=True, max_batch_size=8, **quant,
        kv_cache_config=KvCacheConfig(max_tokens=8192), cuda_graph_config=CudaGraphConfig(batch_sizes=(1,)),
    )
    built = build_engine(llm_args, device)
    runner = getattr(built.engine.runner, "inner", built.engine.runner)
    blocks = -(-(args.context + 1) // runner.tokens_per_block)
    attention = StepAttentionInputs([1], [args.context], [list(range(blocks))], runner.tokens_per_block, device)
    step = StepInputs([1], [args.context], attention, [0])
    runner.graphs.run(step, None)
    graph = runner.graphs._graphs[1]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    step_ms = start.elapsed_time(end) / args.iters
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiled_steps = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled_steps):
                graph.replay()
            torch.cuda.synchronize(device)
        if rank == 0:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows), flush=True)
            kernel_us = sum(e.self_device_time_total for e in prof.key_averages()) / profiled_steps
            print(f"kernel time per step {kernel_us:.1f} us", flush=True)
    result = {
        "tp": args.tp, "rank": rank, "step_ms": step_ms, "all_reduce": os.environ.get("RTLLM_ALL_REDUCE", "auto"),
        "quant_algo": args.quant_algo, "left_out": args.leave_out,
    }
    print(json.dumps(result), flush=True)
    if args.out and rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    if args.tp > 1:
        ps.destroy_distributed()


if __name__ == "__main__":
    with torch.inference_mode():
        main()
