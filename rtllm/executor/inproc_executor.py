"""Executor running the engine loop on a background thread of this process."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from rtllm.engine.engine import Engine, EngineLimits, RequestUpdate
from rtllm.engine.kv_cache.events import KVCacheEventBuffer
from rtllm.engine.llm_request import FinishReason, LlmRequest
from rtllm.engine.stats import IterationStatsCollector
from rtllm.executor.executor import GenerationExecutor
from rtllm.executor.output_processor import OutputProcessor
from rtllm.executor.request import GenerationRequest, to_sampling_config
from rtllm.executor.result import GenerationResult, Response, push_responses

logger = logging.getLogger(__name__)

_SHUTDOWN = object()


class InProcessExecutor(GenerationExecutor):
    """Runs :class:`Engine` steps on a daemon thread; requests and aborts arrive
    through an inbox, responses leave through each result's queue."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any | None,
        default_end_ids: tuple[int, ...],
        kv_events: KVCacheEventBuffer | None = None,
        iter_stats: IterationStatsCollector | None = None,
        deliver: Callable[[list[tuple[GenerationResult, Response]]], None] = push_responses,
    ) -> None:
        """``deliver`` hands each step's responses to their results (by default into
        the results' queues of this process; a worker process forwards them instead)."""
        self.engine = engine
        self._deliver = deliver
        self.default_end_ids = default_end_ids
        self.kv_events = kv_events
        self.iter_stats = iter_stats
        engine.track_finished = iter_stats is not None
        self._outputs = OutputProcessor(tokenizer)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._results: dict[int, GenerationResult] = {}
        self._ids = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        # Monotonic time of the last completed step; read by health checks.
        self.last_step_time = time.monotonic()
        self._thread = threading.Thread(target=self._run_loop, name="rtllm-engine", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationResult:
        params = request.sampling_params
        beam_width = (params.best_of or params.n) if params.use_beam_search else 1
        self.engine.validate(request.prompt_token_ids, params.max_tokens, beam_width)
        # Resolved here, in the caller's thread: bad input raises to the caller, and
        # compiling a grammar never holds up the engine loop.
        runner = self.engine.runner
        sampling = to_sampling_config(
            params, self.default_end_ids, self._outputs.tokenizer, self.engine.limits.vocab_size, runner.device
        )
        grammar = self._grammar_for(sampling) if sampling.guided is not None else None
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor has been shut down")
            request.request_id = next(self._ids)
            result = GenerationResult(request.request_id, request.prompt, request.prompt_token_ids, self.abort)
            self._inbox.put(("submit", request, result, sampling, grammar))
        return result

    def _grammar_for(self, sampling: Any) -> Any:
        """A fresh grammar matcher for a guided request (the backend is built on first use)."""
        tokenizer = self._outputs.tokenizer
        if tokenizer is None:
            raise ValueError("guided_decoding needs a tokenizer (the LLM was built with skip_tokenizer_init=True)")
        with self._lock:
            backend = self.engine.sampler.grammar_backend
            if backend is None:
                from rtllm.structured import GrammarBackend

                # Compact JSON (no free whitespace): small models otherwise loop on whitespace.
                backend = GrammarBackend(
                    tokenizer, self.engine.limits.vocab_size, stop_token_ids=self.default_end_ids, any_whitespace=False
                )
                self.engine.sampler.grammar_backend = backend
        stops = sorted(sampling.end_ids | sampling.stop_token_ids)
        return backend.new_matcher(sampling.guided, stop_token_ids=stops)

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(_SHUTDOWN)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def is_alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive()

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    @property
    def limits(self) -> EngineLimits:
        return self.engine.limits

    def validate(self, prompt_token_ids: list[int], max_tokens: int, beam_width: int = 1) -> None:
        self.engine.validate(prompt_token_ids, max_tokens, beam_width)

    def stats(self) -> dict[str, int]:
        """A snapshot of engine load (read without locking; values may be one step old)."""
        engine = self.engine
        kv_cache = engine.kv_cache
        return {
            "num_running": len(engine.scheduler.running),
            "num_waiting": len(engine.scheduler.waiting),
            "num_steps": engine.num_steps,
            "kv_blocks_total": kv_cache.num_blocks,
            "kv_blocks_used": kv_cache.num_blocks - kv_cache.num_free_blocks,
            "prefix_cache_hit_blocks": kv_cache.counters.reused_blocks,
            "prefix_cache_queried_blocks": kv_cache.counters.reused_blocks + kv_cache.counters.missed_blocks,
            "num_paused_total": engine.scheduler.num_paused_total,
        }

    # ---- engine thread -----------------------------------------------------------------
    def _run_loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while self._drain_inbox(block=not self.engine.has_work):
                if not self.engine.has_work:
                    continue
                started = time.monotonic()
                try:
                    updates = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - a broken step must not kill the loop
                    logger.exception("engine step failed; failing its running requests")
                    updates = self._fail_all(f"{type(exc).__name__}: {exc}")
                self.last_step_time = time.monotonic()
                self._dispatch(updates)
                if self.iter_stats is not None:
                    self.iter_stats.record(self.engine, self.last_step_time - started)
        finally:
            self.engine.shutdown()
            for request_id, result in list(self._results.items()):
                self._finish(result, FinishReason.CANCELLED.value)
                self._results.pop(request_id, None)
            # Requests submitted after the loop stopped reading the inbox.
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple) and item[0] == "submit":
                    self._finish(item[2], FinishReason.CANCELLED.value)

    def _drain_inbox(self, block: bool) -> bool:
        """Take in new requests and aborts; returns False on shutdown."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _SHUTDOWN:
                return False
            if item[0] == "submit":
                self._add(*item[1:])
            else:
                self._abort(item[1])

    def _add(self, request: GenerationRequest, result: GenerationResult, sampling: Any, grammar: Any) -> None:
        try:
            limits = self.engine.limits
            self.engine.add_request(
                LlmRequest(
                    request.request_id,
                    list(request.prompt_token_ids),
                    sampling,
                    limits.max_seq_len,
                    priority=request.priority,
                    cache_salt=request.cache_salt,
                    grammar=grammar,
                )
            )
            self._outputs.add(request)
            self._results[request.request_id] = result
        except Exception as exc:  # noqa: BLE001
            logger.exception("could not add request %d", request.request_id)
            self._finish(result, "error", str(exc))

    def _finish(self, result: GenerationResult, finish_reason: str, error: str | None = None) -> None:
        """Deliver a request's final, empty response (cancelled or refused)."""
        self._deliver([(result, Response([], finished=True, finish_reason=finish_reason, error=error))])

    def _abort(self, client_id: int) -> None:
        cancelled = self.engine.finish_client_request(client_id, FinishReason.CANCELLED)
        if cancelled:
            result = self._results.pop(client_id, None)
            self._outputs.remove(client_id)
            if result is not None:
                self._finish(result, FinishReason.CANCELLED.value)

    def _fail_all(self, message: str) -> list[RequestUpdate]:
        updates = []
        for request_id, request in list(self.engine.requests.items()):
            self.engine.finish_request(request_id, FinishReason.ERROR, message)
            updates.append(
                RequestUpdate(request_id, [], True, FinishReason.ERROR, message,
                              client_id=request.client_id, seq_index=request.seq_index)
            )
        return updates

    def _dispatch(self, updates: list[RequestUpdate]) -> None:
        deliveries: list[tuple[GenerationResult, Response]] = []
        for update in updates:
            client_id = update.client_request_id
            result = self._results.get(client_id)
            if result is None:
                continue
            try:
                responses, stopped = self._outputs.process(update)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure
                logger.exception("output processing failed for request %d", client_id)
                self._outputs.remove(client_id)
                self.engine.finish_client_request(client_id, FinishReason.ERROR, str(exc))
                responses = [Response([], finished=True, finish_reason="error", error=str(exc))]
                stopped = False
            if stopped:
                self.engine.finish_request(update.request_id, FinishReason.STOP)
            for response in responses:
                done = response.finished if response.request_finished is None else response.request_finished
                if done:  # its state was dropped by process() (or above)
                    self._results.pop(client_id, None)
                deliveries.append((result, response))
        self._deliver(deliveries)
