"""The user-facing ``LLM`` class (TensorRT-LLM's LLM API)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from rtllm.engine.stats import IterationStatsCollector
from rtllm.executor.inproc_executor import InProcessExecutor
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult
from rtllm.llmapi.build import build_engine
from rtllm.llmapi.llm_args import LlmArgs
from rtllm.sampling_params import SamplingParams

if TYPE_CHECKING:  # the multi-process executor (zmq, msgspec) loads only when used
    from rtllm.executor.mp_executor import MultiProcessExecutor

logger = logging.getLogger(__name__)

RequestOutput = GenerationResult
"""The result of one request: ``prompt``, ``prompt_token_ids``, ``outputs``, ``finished``."""

PromptInput = str | list[int] | dict[str, Any]


class LLM:
    """Loads a model and generates text with inflight batching.

    Example::

        llm = LLM()  # the embedded default model
        out = llm.generate("The capital of France is", SamplingParams(max_tokens=16))
        print(out.outputs[0].text)

    Args:
        model: Hugging Face model directory or ``.gguf`` file; None for the
            embedded default model (SmolLM2-135M-Instruct).
        tokenizer: Tokenizer source when it differs from ``model``.
        **kwargs: Any other field of :class:`rtllm.llmapi.llm_args.LlmArgs`
            (``dtype``, ``max_batch_size``, ``max_num_tokens``, ``max_seq_len``,
            ``kv_cache_config``, ``scheduler_config``, ``skip_tokenizer_init``, ...).
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, **kwargs: Any) -> None:
        allowed = {f.name for f in dataclasses.fields(LlmArgs)}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {unknown}; allowed: {sorted(allowed)}")
        self.args = LlmArgs(model=model, tokenizer=tokenizer, **kwargs)
        self._executor: InProcessExecutor | MultiProcessExecutor | None = None
        runner = None
        if self.args.tensor_parallel_size * self.args.pipeline_parallel_size > 1:
            from rtllm.executor.launched_ranks import join_world, launched_rank

            launched = launched_rank()
            if launched is None:
                self._start_workers()
                return
            # torchrun / srun started every rank: only rank 0 gets past join_world.
            built = join_world(self.args, launched)
            runner = built.engine.runner
        else:
            built = build_engine(self.args)
        self.model_config = built.model_config
        self.model_path = built.model_path
        self.tokenizer = built.tokenizer
        self.dtype = built.dtype
        self.device = built.device
        iter_stats = None
        if self.args.enable_iter_perf_stats:
            iter_stats = IterationStatsCollector(self.args.iter_stats_max_iterations or 1000)
        # Everything built so far (torch, the model's modules, the engine) lives as long
        # as the LLM: keep it out of the garbage collector's full passes, which at
        # hundreds of thousands of objects stall the engine loop for milliseconds.
        # shutdown() unfreezes, so an LLM's own cycles are collectable once it is gone.
        gc.collect()
        gc.freeze()
        executor_args = (built.engine, built.tokenizer, built.end_ids)
        if runner is None:
            self._executor = InProcessExecutor(*executor_args, kv_events=built.kv_events, iter_stats=iter_stats)
        else:
            from rtllm.executor.launched_ranks import RankZeroExecutor

            self._executor = RankZeroExecutor(runner, *executor_args, kv_events=built.kv_events, iter_stats=iter_stats)

    def _start_workers(self) -> None:
        """Tensor/pipeline parallelism: the engine runs in one worker process per rank; this
        process keeps the tokenizer and a proxy executor."""
        from rtllm.executor.mp_executor import MultiProcessExecutor
        from rtllm.llmapi.build import resolve_model_path
        from rtllm.models.loader import load_model_config

        self.model_path = resolve_model_path(self.args.model)
        self.model_config = load_model_config(self.model_path)
        self.tokenizer = None
        if not self.args.skip_tokenizer_init:
            from rtllm.llmapi.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.model_path, self.args.tokenizer)
        self.dtype = self.args.dtype
        self.device = torch.device(self.args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._executor = MultiProcessExecutor(self.args)

    @property
    def executor(self) -> InProcessExecutor | MultiProcessExecutor:
        if self._executor is None:
            raise RuntimeError("the LLM has been shut down")
        return self._executor

    def generate(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: float | Sequence[float] = 0.0,
        cache_salt: str | None = None,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt or a batch, blocking until all finish.

        ``inputs`` is a string, a list of token ids, a dict with ``prompt`` or
        ``prompt_token_ids``, or a list of these. ``sampling_params`` is one
        :class:`SamplingParams` for all or a list with one per prompt; ``priority``
        likewise (see :meth:`generate_async`). Returns one :data:`RequestOutput` for
        a single prompt, else a list in input order.
        """
        single = _is_single_prompt(inputs)
        if not single and not isinstance(inputs, list | tuple):
            raise ValueError(
                "a prompt must be a string, a list of token ids or a dict (or a list of these); "
                f"got {type(inputs).__name__}"
            )
        prompts: list[PromptInput] = [inputs] if single else list(inputs)  # type: ignore[list-item]
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts"
                )
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        if isinstance(priority, Sequence):
            if len(priority) != len(prompts):
                raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
            priorities = list(priority)
        else:
            priorities = [priority] * len(prompts)
        results: list[RequestOutput] = []
        try:
            for prompt, params, prio in zip(prompts, params_list, priorities, strict=True):
                results.append(self.generate_async(prompt, params, priority=prio, cache_salt=cache_salt))
        except BaseException:
            for result in results:
                result.abort()
            raise
        show = use_tqdm and len(results) > 1
        for result in tqdm(results, desc="Processed requests", disable=not show):
            result.result()
        return results[0] if single else results

    def generate_async(
        self,
        inputs: PromptInput,
        sampling_params: SamplingParams | None = None,
        streaming: bool = False,
        priority: float = 0.0,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        """Submit one prompt and return at once.

        The result can be awaited (``await out``), waited on (``out.result()``) or
        iterated (``async for out in ...``); with ``streaming=True`` each iteration
        carries ``outputs[0].text_diff`` and ``token_ids_diff``.

        ``priority``: waiting requests are admitted highest priority first, first
        come first served within a priority (default 0). ``cache_salt``: requests
        with different salts never share KV blocks (e.g. one salt per tenant).
        """
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int | float) or isinstance(priority, bool) or not math.isfinite(priority):
            raise ValueError(f"priority must be a finite number, got {priority!r}")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string or None, got {cache_salt!r}")
        prompt_text, token_ids = self._tokenize(inputs, params)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens :]  # keep the last k tokens
        request = GenerationRequest(
            token_ids, params, prompt=prompt_text, streaming=streaming, priority=float(priority), cache_salt=cache_salt
        )
        return self.executor.submit(request)

    def get_stats(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Iteration stats recorded since the last call (needs ``enable_iter_perf_stats=True``).

        Each entry: ``iter``, ``timestamp``, ``iterLatencyMS``, ``numActiveRequests``,
        ``numQueuedRequests``, ``numCompletedRequests``, ``kvCacheStats`` (blocks
        max/free/used, reused/missed, ``cacheHitRate``, host tier), ``inflightBatchingStats``
        (context/generation requests and tokens scheduled, admitted, paused) and
        ``requestStats`` (per request: ``stage``, tokens, ``timeToFirstTokenMs``).
        Waits up to ``timeout`` seconds for the first entry; returns [] if none.
        """
        collector = self.executor.iter_stats
        if collector is None:
            raise RuntimeError("iteration stats are off; create the LLM with enable_iter_perf_stats=True")
        return collector.get(timeout)

    async def get_stats_async(self, timeout: float = 2.0) -> AsyncIterator[dict[str, Any]]:
        """Like :meth:`get_stats`, as an async iterator that does not block the event loop."""
        for entry in await asyncio.to_thread(self.get_stats, timeout):
            yield entry

    def get_kv_cache_events(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """KV cache events since the last call, oldest first (needs
        ``KvCacheConfig(event_buffer_max_size=N)``).

        Each event is ``{"event_id": n, "data": {"type": ...}}`` with types ``created``,
        ``stored`` (``parent_hash`` and ``blocks`` with ``block_hash`` and ``token_ids``),
        ``removed`` (``block_hashes``) and ``updated`` (a block moved between cache
        levels: 0 = device, 1 = host). Waits up to ``timeout`` seconds for the first.
        """
        events = self.executor.kv_events
        if events is None:
            raise RuntimeError(
                "KV cache events are off; pass kv_cache_config=KvCacheConfig(event_buffer_max_size=N)"
            )
        return events.get(timeout)

    async def get_kv_cache_events_async(self, timeout: float = 2.0) -> AsyncIterator[dict[str, Any]]:
        """Like :meth:`get_kv_cache_events`, as an async iterator."""
        for event in await asyncio.to_thread(self.get_kv_cache_events, timeout):
            yield event

    def _tokenize(self, inputs: PromptInput, params: SamplingParams) -> tuple[str | None, list[int]]:
        if isinstance(inputs, dict):
            if "prompt_token_ids" in inputs:
                inputs = list(inputs["prompt_token_ids"])
            elif "prompt" in inputs:
                inputs = inputs["prompt"]
            else:
                raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key")
        if isinstance(inputs, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids with skip_tokenizer_init=True")
            if not inputs:
                raise ValueError("prompt is empty")
            return inputs, self.tokenizer.encode(inputs, add_special_tokens=params.add_special_tokens)
        if isinstance(inputs, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in inputs
        ):
            return None, list(inputs)
        raise ValueError(
            f"a prompt must be a string, a list of token ids or a dict, got {type(inputs).__name__}"
        )

    def shutdown(self) -> None:
        """Stop the engine; unfinished requests finish as cancelled."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
            gc.unfreeze()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _is_single_prompt(inputs: object) -> bool:
    if isinstance(inputs, str | dict):
        return True
    return isinstance(inputs, list | tuple) and (
        len(inputs) == 0 or isinstance(inputs[0], int) and not isinstance(inputs[0], bool)
    )
