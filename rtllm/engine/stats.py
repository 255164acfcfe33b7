"""Per-iteration and per-request engine stats, in TensorRT-LLM's shapes.

After each step the engine thread records one dict per iteration (timestamp,
latency, queue and batch sizes, tokens scheduled, KV cache use and reuse) with the
stats of every request the iteration touched (stage, tokens, TTFT). Readers on any
thread take them with :meth:`IterationStatsCollector.get`. Only the newest
``max_iterations`` entries are kept until read.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rtllm.engine.drain_buffer import DrainBuffer
from rtllm.engine.llm_request import LlmRequest, RequestState

if TYPE_CHECKING:
    from rtllm.engine.engine import Engine


def request_stage(request: LlmRequest) -> str:
    """TensorRT-LLM's request stage names."""
    if request.state is RequestState.FINISHED:
        return "GENERATION_COMPLETE"
    if request.state is RequestState.WAITING:
        return "QUEUED"
    if request.num_computed_tokens < request.num_prompt_tokens:
        return "CONTEXT_IN_PROGRESS"
    return "GENERATION_IN_PROGRESS"


def request_stats(request: LlmRequest, scheduled: bool) -> dict[str, Any]:
    ttft = None
    if request.first_token_time is not None:
        ttft = (request.first_token_time - request.arrival_time) * 1000.0
    return {
        "id": request.request_id,
        "stage": request_stage(request),
        "scheduled": scheduled,
        "numPromptTokens": request.num_prompt_tokens,
        "numGeneratedTokens": request.num_committed_output_tokens,
        "numComputedTokens": request.num_computed_tokens,
        "numReusedTokens": request.num_cached_tokens,
        "numPreemptions": request.num_preemptions,
        "timeToFirstTokenMs": ttft,
        "finishReason": None if request.finish_reason is None else request.finish_reason.value,
    }


class IterationStatsCollector:
    """A bounded, thread-safe buffer of iteration stats."""

    def __init__(self, max_iterations: int = 1000) -> None:
        self._buffer: DrainBuffer[dict[str, Any]] = DrainBuffer(max_iterations)

    def record(self, engine: Engine, latency_s: float) -> None:
        """Summarise the step ``engine`` just ran (engine thread only)."""
        output = engine.last_output
        scheduled = output.scheduled if output is not None else []
        scheduler = engine.scheduler
        kv = engine.kv_cache
        counters = kv.counters
        context = [s for s in scheduled if s.is_context]
        finished = engine.take_finished()
        scheduled_ids = {s.request.request_id for s in scheduled}
        touched = {r.request_id: r for r in scheduler.running}
        touched.update((r.request_id, r) for r in finished)
        entry = {
            "iter": engine.num_steps,
            "timestamp": time.time(),
            "iterLatencyMS": latency_s * 1000.0,
            "numActiveRequests": len(scheduler.running),
            "numQueuedRequests": len(scheduler.waiting),
            "numCompletedRequests": len(finished),
            "kvCacheStats": {
                "maxNumBlocks": kv.num_blocks,
                "freeNumBlocks": kv.num_free_blocks,
                "usedNumBlocks": kv.num_blocks - kv.num_free_blocks,
                "cachedFreeNumBlocks": kv.pool.num_cached_free_blocks,
                "tokensPerBlock": kv.tokens_per_block,
                "allocTotalBlocks": counters.alloc_total_blocks,
                "allocNewBlocks": counters.alloc_new_blocks,
                "reusedBlocks": counters.reused_blocks,
                "missedBlocks": counters.missed_blocks,
                "cacheHitRate": counters.cache_hit_rate,
                "hostUsedNumBlocks": kv.host.num_used_blocks if kv.host is not None else 0,
                "offloadedBlocks": counters.offloaded_blocks,
                "onloadedBlocks": counters.onloaded_blocks,
            },
            "inflightBatchingStats": {
                "numScheduledRequests": len(scheduled),
                "numContextRequests": len(context),
                "numGenRequests": len(scheduled) - len(context),
                "numCtxTokens": sum(s.num_new_tokens for s in context),
                "numGenTokens": sum(s.num_new_tokens for s in scheduled if not s.is_context),
                "numAdmittedRequests": len(output.admitted) if output is not None else 0,
                "numPausedRequests": len(output.paused) if output is not None else 0,
            },
            "requestStats": [request_stats(r, rid in scheduled_ids) for rid, r in touched.items()],
        }
        self._buffer.put(entry)

    def get(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Take every buffered iteration, waiting up to ``timeout`` seconds for the first."""
        return self._buffer.drain(timeout)
