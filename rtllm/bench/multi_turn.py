"""Multi-turn benchmark (``rtllm bench throughput --num-turns T``): prefix reuse across turns.

Each conversation (:class:`rtllm.bench.workloads.Conversation`) runs its turns one
after another: turn ``t + 1`` is submitted when turn ``t`` has finished, with the
prompt of turn ``t`` + the tokens it generated + new user tokens, so with block
reuse it only has to prefill what is new. Conversations run concurrently, at most
``concurrency`` at a time (all at once when None). Every turn is a request of the
report; the ``multi_turn`` section separates the TTFT of first turns (nothing of
theirs is cached, bar a shared prefix) from that of later turns (where reuse applies).
A failed turn ends its conversation; its later turns are counted as skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from rtllm.bench.dataset import BenchRequest
from rtllm.bench.metrics import BenchmarkReport, RequestRecord, Stats
from rtllm.bench.throughput import finish_report, run_requests, start_measuring, stream_request
from rtllm.bench.workloads import Conversation

logger = logging.getLogger(__name__)

_MS = 1000.0


@dataclass(slots=True)
class TurnRecord:
    """Timing of one finished turn."""

    conversation: int
    turn: int
    record: RequestRecord


@dataclass(slots=True)
class ConversationRun:
    """Turns that finished, errors of those that failed, and the turns never run."""

    turns: list[TurnRecord]
    errors: list[str]
    num_skipped_turns: int = 0


async def run_conversations_async(
    llm: Any,
    conversations: Sequence[Conversation],
    concurrency: int | None = None,
    progress: tqdm | None = None,
) -> ConversationRun:
    """Run every conversation's turns in order, ``concurrency`` conversations at a time.

    Invalid turns (rejected at submission, e.g. longer than ``max_seq_len``) raise
    ``ValueError`` at once; a turn failing in the engine ends its conversation.
    """
    from rtllm.executor.result import RequestError

    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    run = ConversationRun(turns=[], errors=[])
    pending = iter(enumerate(conversations))

    async def converse(index: int, conversation: Conversation) -> None:
        prompt: tuple[int, ...] = ()
        generated: list[int] = []
        for turn in range(conversation.num_turns):
            request = conversation.turn_request(turn, prompt, generated)
            try:
                record, generated = await stream_request(
                    llm, request.inputs, request.sampling_params()
                )
            except (RequestError, RuntimeError) as exc:
                logger.warning("conversation %d, turn %d failed: %s", index, turn, exc)
                run.errors.append(str(exc))
                run.num_skipped_turns += conversation.num_turns - turn - 1
                if progress is not None:
                    progress.update(conversation.num_turns - turn)
                return
            run.turns.append(TurnRecord(index, turn, record))
            prompt = request.input_ids or ()
            if progress is not None:
                progress.update(1)

    async def worker() -> None:
        for index, conversation in pending:
            await converse(index, conversation)

    num_workers = (
        len(conversations) if concurrency is None else min(concurrency, len(conversations))
    )
    tasks = [asyncio.ensure_future(worker()) for _ in range(num_workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    run.turns.sort(key=lambda t: (t.conversation, t.turn))
    return run


def _stats(values: list[float]) -> dict[str, float | int] | None:
    stats = Stats.of(values, _MS)
    return None if stats is None else stats.to_dict()


def multi_turn_section(
    run: ConversationRun, conversations: Sequence[Conversation]
) -> dict[str, Any]:
    """The ``multi_turn`` report section of a run of ``conversations``.

    ``ttft_first_turn_ms`` / ``ttft_later_turns_ms``: TTFT stats of turn 0 and of
    every later turn; ``ttft_mean_by_turn_ms`` and ``mean_input_len_by_turn``: one
    value per turn index (None where no turn of that index finished).
    """
    num_turns = max((c.num_turns for c in conversations), default=0)
    by_turn: list[list[RequestRecord]] = [[] for _ in range(num_turns)]
    for turn in run.turns:
        by_turn[turn.turn].append(turn.record)

    def ttfts(records: list[RequestRecord]) -> list[float]:
        return [t for r in records if (t := r.ttft) is not None]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    later = [r for records in by_turn[1:] for r in records]
    return {
        "num_conversations": len(conversations),
        "num_turns": num_turns,
        "turns_completed": len(run.turns),
        "turns_skipped": run.num_skipped_turns,
        "mean_input_len_by_turn": [
            mean([float(r.input_tokens) for r in records]) for records in by_turn
        ],
        "ttft_mean_by_turn_ms": [
            None if (m := mean(ttfts(records))) is None else m * _MS for records in by_turn
        ],
        "ttft_first_turn_ms": _stats(ttfts(by_turn[0]) if by_turn else []),
        "ttft_later_turns_ms": _stats(ttfts(later)),
    }


def multi_turn_benchmark(
    llm: Any,
    conversations: Sequence[Conversation],
    *,
    concurrency: int | None = None,
    warmup_set: Sequence[BenchRequest] = (),
    metadata: dict[str, Any] | None = None,
    show_progress: bool = True,
    sections: dict[str, dict[str, Any] | None] | None = None,
) -> BenchmarkReport:
    """Warm up with ``warmup_set`` (single requests), run the conversations, build the report.

    The report's figures count every turn as a request; its ``multi_turn`` section
    is :func:`multi_turn_section`, its ``kv_cache`` section the run's prefix-cache
    counters. ``sections`` are further report sections.
    """
    if not conversations:
        raise ValueError("the benchmark has no conversations")
    if warmup_set:
        logger.info("warming up with %d request(s)", len(warmup_set))
        run_requests(llm, warmup_set, concurrency)
    kv_before = start_measuring(llm)
    total = sum(c.num_turns for c in conversations)
    logger.info(
        "benchmarking %d conversation(s), %d turn(s), concurrency %s",
        len(conversations),
        total,
        concurrency or "unlimited",
    )
    with tqdm(
        total=total, desc="multi-turn benchmark", disable=not show_progress, unit="turn"
    ) as bar:
        run = asyncio.run(run_conversations_async(llm, conversations, concurrency, bar))
    meta: dict[str, Any] = {
        "mode": "throughput",
        "workload": "multi-turn",
        "concurrency": concurrency if concurrency is not None else "unlimited",
        "warmup": len(warmup_set),
    }
    meta.update(metadata or {})
    return finish_report(
        llm,
        [t.record for t in run.turns],
        run.errors,
        meta,
        kv_before,
        {**(sections or {}), "multi_turn": multi_turn_section(run, conversations)},
    )
