"""The ``rtllm`` command line: ``rtllm generate`` (more subcommands to come)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from rtllm.sampling_params import SamplingParams


def add_cache_and_scheduler_args(group: Any) -> None:
    """KV reuse, host tier, capacity policy and beam width options (shared by generate,
    bench and serve).

    Every default is None, meaning "the LLM API's default".
    """
    group.add_argument("--enable-block-reuse", action=argparse.BooleanOptionalAction, default=None,
                       help="reuse the KV of shared prompt prefixes (default: on)")
    group.add_argument("--host-cache-size", type=int, default=None, metavar="BYTES",
                       help="host memory for KV blocks evicted from the device pool (default: none)")
    group.add_argument("--max-beam-width", type=int, default=None,
                       help="largest beam width a request may use (default: 1)")
    group.add_argument("--capacity-scheduler-policy", default=None,
                       choices=["GUARANTEED_NO_EVICT", "MAX_UTILIZATION", "STATIC_BATCH"],
                       help="admission policy (default: GUARANTEED_NO_EVICT)")
    group.add_argument("--quant-algo", default=None, metavar="ALGO",
                       help="quantize the weights on load: W8A16, W4A16, W4A16_AWQ, W4A16_GPTQ, "
                            "W8A16_GPTQ, FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A8_SQ_PER_CHANNEL")
    group.add_argument("--kv-cache-quant-algo", default=None, choices=["INT8", "FP8"],
                       help="store the KV cache quantized")
    group.add_argument("--quant-group-size", type=int, default=None,
                       help="group size of groupwise weight quantization (default: 128)")


def add_parallel_args(group: Any) -> None:
    """Tensor/pipeline parallel degrees (shared by generate, bench and serve)."""
    group.add_argument("--tp-size", "--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int,
                       default=None, help="ranks sharing every layer (default: 1)")
    group.add_argument("--pp-size", "--pp", "--pipeline-parallel-size", dest="pipeline_parallel_size", type=int,
                       default=None, help="pipeline stages of contiguous layers (default: 1; CUDA graphs are "
                                          "not captured with more than one stage)")


def parallel_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM's parallel degrees given on the command line (none: single process)."""
    return {
        name: getattr(args, name)
        for name in ("tensor_parallel_size", "pipeline_parallel_size")
        if getattr(args, name) is not None
    }


def graphs_allowed(args: argparse.Namespace) -> bool:
    """CUDA graphs are off with pipeline parallelism (not supported yet) or when disabled."""
    return not args.disable_cuda_graphs and (args.pipeline_parallel_size or 1) == 1


def quant_config_of(args: argparse.Namespace) -> Any:
    """The :class:`rtllm.quantization.QuantConfig` the command line asks for, or None."""
    if args.quant_algo is None and args.kv_cache_quant_algo is None:
        if args.quant_group_size is not None:
            raise ValueError("--quant-group-size needs --quant-algo")
        return None
    from rtllm.quantization import QuantConfig

    kwargs: dict[str, Any] = {"quant_algo": args.quant_algo, "kv_cache_quant_algo": args.kv_cache_quant_algo}
    if args.quant_group_size is not None:
        kwargs["group_size"] = args.quant_group_size
    return QuantConfig(**kwargs)


def cache_and_scheduler_kwargs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(KvCacheConfig fields, SchedulerConfig fields) given on the command line."""
    kv: dict[str, Any] = {}
    if args.enable_block_reuse is not None:
        kv["enable_block_reuse"] = args.enable_block_reuse
    if args.host_cache_size is not None:
        kv["host_cache_size"] = args.host_cache_size
    sched = {}
    if args.capacity_scheduler_policy is not None:
        sched["capacity_scheduler_policy"] = args.capacity_scheduler_policy
    return kv, sched


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    from rtllm.llmapi.llm_args import CudaGraphConfig, KvCacheConfig, LlmArgs

    defaults = LlmArgs()
    kv = KvCacheConfig()
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="Hugging Face model directory or .gguf file "
                       "(default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--tokenizer", default=None, help="tokenizer source, if not the model's")
    group.add_argument("--dtype", default=defaults.dtype,
                       help="auto, float32, float16 or bfloat16 (auto: float32 on CPU, checkpoint dtype on GPU)")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    group.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                       help="most requests in one engine step")
    group.add_argument("--max-num-tokens", type=int, default=defaults.max_num_tokens,
                       help="most tokens in one engine step")
    group.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    group.add_argument("--tokens-per-block", type=int, default=kv.tokens_per_block, help="tokens per KV block")
    group.add_argument("--kv-cache-max-tokens", type=int, default=None, help="KV pool size in tokens")
    group.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=kv.free_gpu_memory_fraction,
                       help="fraction of free GPU memory for the KV pool")
    group.add_argument("--enable-chunked-prefill", action="store_true",
                       help="split long prompts across steps")
    add_cache_and_scheduler_args(group)
    add_parallel_args(group)
    group.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy: random weights (benchmarking a shape)")
    group.add_argument("--cuda-graph-max-batch-size", type=int, default=CudaGraphConfig().max_batch_size,
                       help="largest generation batch captured as a CUDA graph (CUDA only)")
    group.add_argument("--disable-cuda-graphs", action="store_true", help="run every step eagerly")
    group.add_argument("--disable-overlap-scheduler", action="store_true",
                       help="finish each step before preparing the next (overlap is on by default on CUDA)")


def build_llm(args: argparse.Namespace, **overrides: Any) -> Any:
    """Build an :class:`rtllm.LLM` from the engine options of :func:`add_engine_args`.

    ``overrides`` are further ``LLM`` arguments (e.g. ``skip_tokenizer_init``).
    """
    from rtllm import LLM, CudaGraphConfig, KvCacheConfig, SchedulerConfig

    kv, sched = cache_and_scheduler_kwargs(args)
    graphs = CudaGraphConfig(max_batch_size=args.cuda_graph_max_batch_size) if graphs_allowed(args) else None
    return LLM(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_seq_len=args.max_seq_len,
        enable_chunked_prefill=args.enable_chunked_prefill,
        load_format=args.load_format,
        kv_cache_config=KvCacheConfig(
            tokens_per_block=args.tokens_per_block,
            max_tokens=args.kv_cache_max_tokens,
            free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction,
            **kv,
        ),
        scheduler_config=SchedulerConfig(**sched),
        max_beam_width=args.max_beam_width or 1,
        quant_config=quant_config_of(args),
        cuda_graph_config=graphs,
        disable_overlap_scheduler=True if args.disable_overlap_scheduler else None,
        **parallel_kwargs(args),
        **overrides,
    )


def _generate(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    llm = build_llm(args)
    load_s = time.perf_counter() - start
    prompts = list(args.prompts)
    # A continuation follows its prompt directly; a chat answer goes on its own line.
    separator = "\n" if args.chat else ""
    if args.chat:
        if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
            raise SystemExit("error: --chat needs a tokenizer with a chat template")
        prompts = [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    try:
        if args.stream and len(prompts) == 1:
            result = llm.generate_async(prompts[0], params, streaming=True)
            print(args.prompts[0], end=separator, flush=True)
            for out in result:
                print(out.outputs[0].text_diff, end="", flush=True)
            print()
            outputs = [result]
        else:
            outputs = llm.generate(prompts, params)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            for prompt, out in zip(args.prompts, outputs, strict=True):
                print(f"{prompt}{separator}{out.outputs[0].text}")
        if args.verbose:
            for out in outputs:
                print(f"[finish_reason={out.outputs[0].finish_reason} tokens={len(out.outputs[0].token_ids)}]",
                      file=sys.stderr)
            print(f"[load {load_s:.2f} s]", file=sys.stderr)
    finally:
        llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rtllm`` command."""
    parser = argparse.ArgumentParser(prog="rtllm", description="rtllm: LLM inference engine")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one or more prompts",
                         description="Generate continuations of PROMPTs (greedy unless sampling options are given).")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text(s)")
    add_engine_args(gen)
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    sampling.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)")
    sampling.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    sampling.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    gen.add_argument("-v", "--verbose", action="store_true", help="print finish reasons and load time to stderr")
    gen.set_defaults(func=_generate)

    # Imported here: these modules import this one for the shared engine options.
    from rtllm.bench.cli import add_bench_parser
    from rtllm.quantization.cli import add_quantize_parser
    from rtllm.serve.cli import add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    add_quantize_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rtllm`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
