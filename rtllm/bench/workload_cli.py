"""Command-line options of the reuse and chunked-context workloads of ``rtllm bench``.

``throughput`` and ``latency``:

- ``--shared-prefix-len N``: every synthetic prompt starts with one of
  ``--num-prefixes K`` (default 1) random prefixes of N tokens (round-robin),
  followed by its own ``--input-len`` random tokens. Warm-up requests carry the
  same prefixes with suffixes of their own (``--warmup >= K`` caches every prefix
  before measuring; ``--warmup 0`` starts from a cold cache).

``throughput`` only:

- ``--num-turns T``: each of ``--num-requests`` conversations runs T turns in
  order, turn t+1's prompt being turn t's prompt + its generated tokens +
  ``--input-len`` new tokens; conversations run concurrently (``--concurrency``
  of them at most). See :mod:`rtllm.bench.multi_turn`.
- ``--long-prompt-len L`` [``--long-prompt-after-tokens M``, default 8]: one
  L-token prompt arrives once each of the ``--num-requests`` streams has M
  tokens; reports the streams' inter-token latency while it is prefilled. See
  :mod:`rtllm.bench.long_prompt`.

Every report (any options) has a ``kv_cache`` section: the prefix-cache counters
(reused/missed/onloaded/offloaded blocks, hit rate) of the measured run.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from rtllm.bench.cli import DEFAULT_INPUT_LEN, DEFAULT_NUM_REQUESTS, DEFAULT_OUTPUT_LEN
from rtllm.bench.dataset import BenchRequest
from rtllm.bench.long_prompt import DEFAULT_AFTER_TOKENS, check_long_prompt_budget
from rtllm.bench.metrics import BenchmarkReport

logger = logging.getLogger(__name__)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_workload_args(parser: argparse.ArgumentParser, *, mode: str) -> None:
    """Add the workload options to the ``throughput`` or ``latency`` parser.

    ``latency`` accepts the throughput-only options too (hidden from its help) so
    that :func:`validate_workload_args` can reject them with a clear message.
    """
    if mode == "throughput":
        about = (
            "prefix reuse and chunked context (--shared-prefix-len and --num-turns build a "
            "synthetic dataset)"
        )
    else:
        about = "prefix reuse (--shared-prefix-len builds a synthetic dataset)"
    group = parser.add_argument_group("workloads", about)
    group.add_argument(
        "--shared-prefix-len",
        type=positive_int,
        default=None,
        metavar="N",
        help="prefix every synthetic prompt with one of --num-prefixes shared random "
        "prefixes of N tokens (a shared system prompt); --input-len tokens of "
        "its own follow. Warm-up requests carry the prefixes, so --warmup >= "
        "--num-prefixes measures with the prefixes cached (default: none)",
    )
    group.add_argument(
        "--num-prefixes",
        type=positive_int,
        default=None,
        metavar="K",
        help="distinct shared prefixes, assigned round-robin (default 1; needs "
        "--shared-prefix-len)",
    )

    def shown(text: str) -> str:
        return text if mode == "throughput" else argparse.SUPPRESS

    group.add_argument(
        "--num-turns",
        type=positive_int,
        default=None,
        metavar="T",
        help=shown(
            "multi-turn conversations: each of --num-requests conversations "
            "runs T turns in order, turn t+1's prompt = turn t's prompt + "
            "its generated tokens + --input-len new tokens (reusing the "
            "previous turn's KV); --concurrency conversations at a time. "
            "Reports TTFT of first and of later turns"
        ),
    )
    group.add_argument(
        "--long-prompt-len",
        type=positive_int,
        default=None,
        metavar="L",
        help=shown(
            "once every one of the --num-requests streams has produced "
            "--long-prompt-after-tokens tokens, submit one extra request "
            "with an L-token random prompt; reports the streams' inter-token "
            "latency until its first token. Without --enable-chunked-prefill "
            "--max-num-tokens must be >= L + --num-requests"
        ),
    )
    group.add_argument(
        "--long-prompt-after-tokens",
        type=positive_int,
        default=None,
        metavar="M",
        help=shown(
            f"tokens every stream produces before the long prompt is "
            f"submitted (default {DEFAULT_AFTER_TOKENS}; must be < --output-len)"
        ),
    )


def validate_workload_args(args: argparse.Namespace) -> None:
    """Reject incompatible workload options; ``ValueError`` messages name them."""
    mode = args.bench_mode
    dataset = args.dataset is not None
    if args.num_prefixes is not None and args.shared_prefix_len is None:
        raise ValueError("--num-prefixes needs --shared-prefix-len")
    if args.long_prompt_after_tokens is not None and args.long_prompt_len is None:
        raise ValueError("--long-prompt-after-tokens needs --long-prompt-len")
    for option, value in (
        ("--num-turns", args.num_turns),
        ("--long-prompt-len", args.long_prompt_len),
    ):
        if value is not None and mode != "throughput":
            raise ValueError(f"{option} runs only with `rtllm bench throughput`, not `{mode}`")
    if dataset:
        for option, value in (
            ("--shared-prefix-len", args.shared_prefix_len),
            ("--num-turns", args.num_turns),
        ):
            if value is not None:
                raise ValueError(
                    f"{option} builds a synthetic dataset: it cannot be used with --dataset"
                )
    if args.num_turns is not None and args.long_prompt_len is not None:
        raise ValueError(
            "--num-turns and --long-prompt-len are separate workloads: pass one of them"
        )
    if args.long_prompt_len is not None:
        if getattr(args, "concurrency", None) is not None:
            raise ValueError(
                "--long-prompt-len starts every stream at once: it cannot be used with "
                "--concurrency"
            )
        output_len = args.output_len or DEFAULT_OUTPUT_LEN
        after = args.long_prompt_after_tokens or DEFAULT_AFTER_TOKENS
        if not dataset and not args.output_len_std and output_len <= after:
            raise ValueError(
                f"--long-prompt-after-tokens ({after}) must be smaller than --output-len "
                f"({output_len}): the streams must still be running when the long "
                "prompt arrives"
            )
        if not dataset:
            check_long_prompt_streams(args, args.num_requests or DEFAULT_NUM_REQUESTS)


def check_long_prompt_streams(args: argparse.Namespace, num_streams: int) -> None:
    """Engine limits of the long-prompt workload with ``num_streams`` streams (``ValueError``)."""
    check_long_prompt_budget(
        args.long_prompt_len, num_streams, args.max_num_tokens, args.enable_chunked_prefill
    )
    if args.max_batch_size < num_streams + 1:
        raise ValueError(
            f"--long-prompt-len needs --max-batch-size >= {num_streams + 1} (the "
            f"{num_streams} streams and the long request run together); it is "
            f"{args.max_batch_size}"
        )


def has_workload(args: argparse.Namespace) -> bool:
    """True when a workload option (shared prefix, turns, long prompt) is given."""
    return any(
        getattr(args, name, None) is not None
        for name in ("shared_prefix_len", "num_turns", "long_prompt_len")
    )


def check_submittable(llm: Any, prompt_len: int, max_tokens: int, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if the engine would refuse such a request."""
    try:
        validate = llm.executor.engine.validate
    except (AttributeError, RuntimeError):
        return
    try:
        validate([0] * prompt_len, max_tokens)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _kv_pool_blocks(llm: Any) -> tuple[int, int] | None:
    try:
        kv_cache = llm.executor.engine.kv_cache
        return int(kv_cache.num_blocks), int(kv_cache.tokens_per_block)
    except (AttributeError, RuntimeError, TypeError):
        return None


def run_workload(
    llm: Any,
    args: argparse.Namespace,
    requests: list[BenchRequest],
    metadata: dict[str, Any],
    exclude_ids: set[int],
) -> BenchmarkReport:
    """Run the workload the options ask for on the built ``llm``; return its report.

    ``requests`` is the dataset (the first turns, for ``--num-turns``).
    """
    from rtllm.bench.latency import latency_benchmark
    from rtllm.bench.long_prompt import long_prompt_benchmark
    from rtllm.bench.multi_turn import multi_turn_benchmark
    from rtllm.bench.throughput import throughput_benchmark, warmup_requests
    from rtllm.bench.workloads import multi_turn_dataset, random_request, warmup_dataset

    vocab = llm.model_config.vocab_size
    input_len = args.input_len or DEFAULT_INPUT_LEN
    output_len = args.output_len or DEFAULT_OUTPUT_LEN
    prefix_len = args.shared_prefix_len or 0
    num_prefixes = args.num_prefixes or 1
    show = not args.no_progress
    concurrency = getattr(args, "concurrency", None)
    sections: dict[str, dict[str, Any] | None] = {}
    if args.dataset is not None:  # as without a workload: the dataset's first requests
        warm = warmup_requests(requests, args.warmup)
    else:  # the measured shapes and shared prefixes, with suffixes of their own
        warm = warmup_dataset(
            args.warmup,
            input_len,
            output_len,
            vocab,
            shared_prefix_len=prefix_len,
            num_prefixes=num_prefixes,
            seed=args.seed,
            exclude_ids=exclude_ids,
        )
    if prefix_len:
        sections["shared_prefix"] = {
            "shared_prefix_len": prefix_len,
            "num_prefixes": num_prefixes,
            "assignment": "round-robin",
            "prefixes_cached_by_warmup": min(args.warmup, num_prefixes),
        }
    if args.num_turns is not None:
        conversations = multi_turn_dataset(
            len(requests),
            args.num_turns,
            input_len,
            output_len,
            vocab,
            shared_prefix_len=prefix_len,
            num_prefixes=num_prefixes,
            input_len_std=args.input_len_std,
            output_len_std=args.output_len_std,
            seed=args.seed,
            exclude_ids=exclude_ids,
        )
        longest = max(conversations, key=lambda c: c.last_prompt_len + c.output_tokens[-1])
        check_submittable(
            llm,
            longest.last_prompt_len,
            longest.output_tokens[-1],
            f"--num-turns {args.num_turns}: the last turn's prompt "
            f"({longest.last_prompt_len} tokens) cannot run",
        )
        return multi_turn_benchmark(
            llm,
            conversations,
            concurrency=concurrency,
            warmup_set=warm,
            metadata=metadata,
            show_progress=show,
            sections=sections,
        )
    if args.long_prompt_len is not None:
        length = args.long_prompt_len
        long_request = random_request(
            length, output_len, vocab, seed=args.seed, exclude_ids=exclude_ids
        )
        check_submittable(llm, length, output_len, f"--long-prompt-len {length} cannot run")
        _warn_if_pool_too_small(llm, [*requests, long_request])
        if warm:
            warm.append(
                random_request(
                    length,
                    output_len,
                    vocab,
                    seed=args.seed,
                    tag="long-prompt-warmup",
                    exclude_ids=exclude_ids,
                )
            )
        return long_prompt_benchmark(
            llm,
            requests,
            long_request,
            after_tokens=args.long_prompt_after_tokens or DEFAULT_AFTER_TOKENS,
            warmup_set=warm,
            metadata=metadata,
            show_progress=show,
            sections=sections,
        )
    metadata = {**metadata, "workload": "shared-prefix"}
    if args.bench_mode == "latency":
        return latency_benchmark(
            llm,
            requests,
            warmup=args.warmup,
            metadata=metadata,
            show_progress=show,
            warmup_set=warm,
            sections=sections,
        )
    return throughput_benchmark(
        llm,
        requests,
        concurrency=concurrency,
        warmup=args.warmup,
        metadata=metadata,
        show_progress=show,
        warmup_set=warm,
        sections=sections,
    )


def _warn_if_pool_too_small(llm: Any, requests: list[BenchRequest]) -> None:
    pool = _kv_pool_blocks(llm)
    if pool is None:
        return
    num_blocks, size = pool
    needed = sum(-(-(len(r.input_ids or ()) + r.output_tokens) // size) for r in requests)
    if needed > num_blocks:
        logger.warning(
            "the KV pool holds %d blocks and the streams plus the long request need %d: the long "
            "request may wait for streams to finish (lower --num-requests or raise the KV cache)",
            num_blocks,
            needed,
        )
