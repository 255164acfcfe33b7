"""``rtllm bench throughput|latency``: benchmark the engine (modelled on ``trtllm-bench``).

Parser setup imports nothing heavy; the model, torch and the engine are imported
when a benchmark runs.

Workloads for prefix reuse and chunked context (see :mod:`rtllm.bench.workload_cli`):

- ``--shared-prefix-len N [--num-prefixes K]`` (throughput, latency): prompts
  share one of K random N-token prefixes (a shared system prompt);
- ``--num-turns T`` (throughput): multi-turn conversations, each turn extending
  the previous turn's prompt and output; TTFT of first and later turns;
- ``--long-prompt-len L [--long-prompt-after-tokens M]`` (throughput): an L-token
  prompt arrives among running streams; their inter-token latency meanwhile.

Every report has a ``kv_cache`` section with the prefix-cache counters of the
measured run (reused/missed blocks, hit rate, host-tier onloads/offloads).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 128
DEFAULT_NUM_REQUESTS = 32


def _add_bench_args(parser: argparse.ArgumentParser, *, with_concurrency: bool) -> None:
    from rtllm.bench.workload_cli import add_workload_args
    from rtllm.cli import add_engine_args

    add_engine_args(parser)
    # trtllm-bench's spelling of the engine option --kv-cache-free-gpu-memory-fraction.
    parser.add_argument("--kv-cache-free-gpu-mem-fraction", dest="kv_cache_free_gpu_memory_fraction",
                        type=float, default=argparse.SUPPRESS, metavar="FRACTION",
                        help="alias of --kv-cache-free-gpu-memory-fraction")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", default=None, metavar="JSONL",
                      help='JSON-lines file, one {"prompt": ...} or {"input_ids": [...]} per line, '
                           'optionally with "output_tokens" (default: a synthetic dataset)')
    data.add_argument("--num-requests", type=int, default=None,
                      help=f"requests to run (synthetic default {DEFAULT_NUM_REQUESTS}; "
                           "with --dataset: the first N, default all)")
    data.add_argument("--input-len", type=int, default=None,
                      help=f"synthetic prompt length in tokens (default {DEFAULT_INPUT_LEN})")
    data.add_argument("--output-len", type=int, default=None,
                      help=f"tokens to generate per request (default {DEFAULT_OUTPUT_LEN}; "
                           "with --dataset: for lines without output_tokens)")
    data.add_argument("--input-len-std", type=float, default=0.0,
                      help="std of normal-distributed synthetic prompt lengths (clipped >= 1)")
    data.add_argument("--output-len-std", type=float, default=0.0,
                      help="std of normal-distributed synthetic output lengths (clipped >= 1)")
    data.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset and the engine")
    run = parser.add_argument_group("benchmark")
    if with_concurrency:
        run.add_argument("--concurrency", type=int, default=None,
                         help="most requests in flight (default: submit all at once)")
    run.add_argument("--warmup", type=int, default=2, help="warm-up requests, left out of the figures")
    run.add_argument("--detokenize", action="store_true",
                     help="load the tokenizer and detokenize outputs (default: token ids only, "
                          "unless the dataset has text prompts)")
    run.add_argument("--report-json", default=None, metavar="PATH", help="also write the report as JSON")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_workload_args(parser, mode="throughput" if with_concurrency else "latency")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` command (sub-commands ``throughput`` and ``latency``).

    ``subparsers`` is the object returned by ``ArgumentParser.add_subparsers``.
    Each sub-command sets ``func`` to a callable taking the parsed namespace and
    returning an exit code. Returns the ``bench`` parser.
    """
    bench = subparsers.add_parser(
        "bench", help="benchmark throughput or latency",
        description="Benchmark the engine on a synthetic or JSON-lines dataset.",
    )
    modes = bench.add_subparsers(dest="bench_mode", required=True, metavar="{throughput,latency,serve}")
    throughput = modes.add_parser(
        "throughput", help="offline throughput: all requests (or --concurrency) in flight",
        description="Submit every request at once (or keep --concurrency in flight) and report "
                    "throughput, TTFT, TPOT, inter-token latency and prefix-cache hits. Workloads: "
                    "shared prompt prefixes (--shared-prefix-len), multi-turn conversations "
                    "(--num-turns), a long prompt among running streams (--long-prompt-len).",
    )
    _add_bench_args(throughput, with_concurrency=True)
    throughput.set_defaults(func=functools.partial(run_bench, parser=throughput))
    latency = modes.add_parser(
        "latency", help="latency: one request at a time",
        description="Run requests one at a time and report TTFT, TPOT, inter-token latency and "
                    "prefix-cache hits. Workload: shared prompt prefixes (--shared-prefix-len).",
    )
    _add_bench_args(latency, with_concurrency=False)
    latency.set_defaults(func=functools.partial(run_bench, parser=latency))

    from rtllm.bench.serving import add_serving_parser

    add_serving_parser(modes)
    return bench


def _check_positive(name: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _build_llm(args: argparse.Namespace, need_tokenizer: bool) -> Any:
    from rtllm.cli import build_llm

    return build_llm(args, skip_tokenizer_init=not need_tokenizer, seed=args.seed)


def special_token_ids(llm: Any) -> set[int]:
    """Special token ids of ``llm`` known from its config and tokenizer (BOS, EOS, ...)."""
    ids: set[int] = set()
    config = llm.model_config
    if config.bos_token_id is not None:
        ids.add(config.bos_token_id)
    ids.update(config.eos_token_ids)
    tokenizer = llm.tokenizer
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "all_special_ids", None) or ())
    return ids


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``rtllm bench throughput|latency`` for parsed ``args``; print the report.

    Invalid workload options exit through ``parser.error`` (``ValueError`` without
    a parser). Returns 0, or 1 when some requests failed (the report is still printed).
    """
    from rtllm.bench.dataset import dataset_stats, load_jsonl_dataset
    from rtllm.bench.latency import latency_benchmark
    from rtllm.bench.throughput import throughput_benchmark
    from rtllm.bench.workload_cli import (
        check_long_prompt_streams,
        has_workload,
        run_workload,
        validate_workload_args,
    )
    from rtllm.bench.workloads import shared_prefix_dataset

    def option_error(check: Callable[..., None], *check_args: Any) -> None:
        try:
            check(*check_args)
        except ValueError as exc:
            if parser is None:
                raise
            parser.error(str(exc))

    mode = args.bench_mode
    concurrency = getattr(args, "concurrency", None)
    _check_positive("--num-requests", args.num_requests)
    _check_positive("--input-len", args.input_len)
    _check_positive("--output-len", args.output_len)
    _check_positive("--concurrency", concurrency)
    _check_positive("--warmup", args.warmup, allow_zero=True)
    _check_positive("--input-len-std", args.input_len_std, allow_zero=True)
    _check_positive("--output-len-std", args.output_len_std, allow_zero=True)
    option_error(validate_workload_args, args)

    requests = None
    if args.dataset is not None:
        if args.input_len is not None or args.input_len_std or args.output_len_std:
            logger.warning("--input-len, --input-len-std and --output-len-std are ignored with --dataset")
        requests = load_jsonl_dataset(args.dataset, args.output_len, args.num_requests)
        if args.long_prompt_len is not None:
            option_error(check_long_prompt_streams, args, len(requests))
    need_tokenizer = args.detokenize or (requests is not None and any(r.prompt is not None for r in requests))
    llm = _build_llm(args, need_tokenizer)
    try:
        exclude_ids = special_token_ids(llm)
        if requests is None:
            # Without --shared-prefix-len: exactly synthetic_dataset's requests.
            requests = shared_prefix_dataset(
                args.num_requests or DEFAULT_NUM_REQUESTS,
                args.input_len or DEFAULT_INPUT_LEN,
                args.output_len or DEFAULT_OUTPUT_LEN,
                llm.model_config.vocab_size,
                shared_prefix_len=args.shared_prefix_len or 0,
                num_prefixes=args.num_prefixes or 1,
                input_len_std=args.input_len_std,
                output_len_std=args.output_len_std,
                seed=args.seed,
                exclude_ids=exclude_ids,
            )
            dataset_name = "synthetic"
        else:
            dataset_name = os.path.abspath(args.dataset)
        metadata = {
            "model": llm.model_path,
            "device": str(llm.device),
            "dtype": str(llm.dtype).removeprefix("torch."),
            "load_format": args.load_format,
            "dataset": dataset_name,
            "dataset_stats": dataset_stats(requests),
            "max_batch_size": args.max_batch_size,
            "max_num_tokens": args.max_num_tokens,
            "max_seq_len": args.max_seq_len,
            "tokens_per_block": args.tokens_per_block,
            "seed": args.seed,
            "detokenize": need_tokenizer,
            "tensor_parallel_size": args.tensor_parallel_size or 1,
            "pipeline_parallel_size": args.pipeline_parallel_size or 1,
        }
        show = not args.no_progress
        if has_workload(args):
            report = run_workload(llm, args, requests, metadata, exclude_ids)
        elif mode == "throughput":
            report = throughput_benchmark(llm, requests, concurrency=concurrency, warmup=args.warmup,
                                          metadata=metadata, show_progress=show)
        elif mode == "latency":
            report = latency_benchmark(llm, requests, warmup=args.warmup, metadata=metadata,
                                       show_progress=show)
        else:  # pragma: no cover - argparse restricts the choices
            raise ValueError(f"unknown bench mode {mode!r}")
    finally:
        llm.shutdown()
    print(report.format_table())
    if args.report_json:
        directory = os.path.dirname(os.path.abspath(args.report_json))
        os.makedirs(directory, exist_ok=True)
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
        logger.info("wrote the report to %s", args.report_json)
    return 1 if report.num_failed else 0
