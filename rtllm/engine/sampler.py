"""Batched sampling: logits of the step's sampled rows -> next token ids (+ logprobs).

The pipeline, each stage applied to the whole batch as tensor operations and
skipped when no row uses it:

1. logits processing (:func:`rtllm.engine.logits_processors.process_logits`):
   embedding bias, bad words, ``min_tokens``, n-gram bans, repetition, presence and
   frequency penalties; then user ``logits_processor`` callables (per row);
2. structured output: the rows under a grammar get xgrammar's token bitmask;
3. temperature (greedy rows keep their logits);
4. logprobs (after 1-3, before truncation; see :mod:`rtllm.engine.logprobs`);
5. greedy rows: argmax; the others: top-k, top-p, min-p, then one draw each by the
   exponential race (``argmax(p / q)`` with ``q ~ Exp(1)``, which samples from
   ``p``). A request with a ``seed`` draws its noise from its own generator, so its
   tokens do not depend on what else shares the batch.

A batch where every request is plain greedy takes a bare argmax. Nothing here reads
device data on the host, so a step's sampling is queued without waiting.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rtllm.engine.llm_request import LlmRequest
from rtllm.engine.logits_processors import LogitsParams, PendingTokens, apply_min_p, process_logits
from rtllm.kernels.sampling import filtered_probs
from rtllm.runtime.transfer import to_device

_NOOP = LogitsParams()


@dataclass(slots=True)
class SampleOutput:
    """One step's sampled tokens and what was asked alongside, all on the device.

    ``logprobs``/``ranks``/``top_ids``/``top_logprobs`` are set when any row needs
    logprobs (rows that did not ask are ignored by the caller); ``top_*`` have
    ``max(num_logprobs)`` columns. ``generation_logits`` holds the raw logits of the
    rows in ``generation_logit_rows``.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    generation_logits: torch.Tensor | None = None
    generation_logit_rows: tuple[int, ...] = ()
    # Beam search rows: each row's best next tokens and their log-probabilities.
    beam_top_ids: torch.Tensor | None = None
    beam_top_logprobs: torch.Tensor | None = None
    beam_rows: tuple[int, ...] = ()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The device tensors to bring to the host, by name."""
        names = ("tokens", "logprobs", "ranks", "top_ids", "top_logprobs", "generation_logits",
                 "beam_top_ids", "beam_top_logprobs")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _is_plain_greedy(request: LlmRequest) -> bool:
    s = request.sampling
    return (
        s.greedy
        and s.logits_params is None
        and not s.logits_processors
        and s.guided is None
        and not s.needs_logprobs
        and not s.return_generation_logits
        and not s.use_beam_search
    )


def call_logits_processor(fn: Callable[..., Any], request: LlmRequest, row: torch.Tensor) -> torch.Tensor:
    """Run a user logits processor on one row: ``fn(output_ids, logits)`` (vLLM's form) or
    ``fn(prompt_ids, output_ids, logits)``; it returns the new row (or edits it in place
    and returns None)."""
    try:
        arity = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        arity = 2
    output_ids = list(request.output_token_ids)
    result = fn(request.prompt_token_ids, output_ids, row) if arity >= 3 else fn(output_ids, row)
    if result is None:
        return row
    if not isinstance(result, torch.Tensor) or result.shape != row.shape:
        raise ValueError(
            f"logits_processor must return a tensor of shape {tuple(row.shape)}, got "
            f"{type(result).__name__} {getattr(result, 'shape', '')}"
        )
    return result


def top_k_probs(scaled: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Softmax over exactly each row's ``k`` largest logits (ties broken as ``topk`` does)."""
    device = scaled.device
    k = to_device(ks, torch.long, device).unsqueeze(1)
    indices = scaled.topk(max(ks), dim=-1).indices
    ranks = torch.arange(indices.shape[1], device=device).unsqueeze(0)
    keep = torch.zeros_like(scaled, dtype=torch.bool).scatter_(1, indices, ranks < k)
    return scaled.masked_fill(~keep, float("-inf")).softmax(dim=-1)


class Sampler:
    """Samples one token per row of a logits matrix."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.grammar_backend: Any = None  # a rtllm.structured.GrammarBackend, set when first needed

    def sample(self, logits: torch.Tensor, requests: list[LlmRequest]) -> list[int]:
        """Sample a token for each row of ``logits`` ``[len(requests), vocab]``."""
        return self.sample_async(logits, requests).tokens.tolist()

    @torch.inference_mode()
    def sample_async(
        self, logits: torch.Tensor, requests: list[LlmRequest], pending: PendingTokens | None = None
    ) -> SampleOutput:
        """Sample without waiting for the device; the overlap loop reads the result one
        step later. Penalties read ``output_token_ids``, whose last entry may be a
        placeholder for a token still on the device: ``pending`` gives those tokens.
        Logits processors, multi-token bad words and grammars need every token on the
        host; the engine commits the previous step first for them."""
        if all(_is_plain_greedy(r) for r in requests):
            return SampleOutput(logits.argmax(dim=-1))
        logits = logits.float()
        generation_rows = tuple(i for i, r in enumerate(requests) if r.sampling.return_generation_logits)
        generation_logits = None
        if generation_rows:
            generation_logits = logits.index_select(0, to_device(list(generation_rows), torch.long, logits.device))
        self._process(logits, requests, pending)
        temperature = [1.0 if r.sampling.greedy else r.sampling.temperature for r in requests]
        scaled = logits / to_device(temperature, torch.float32, logits.device).clamp(min=1e-6).unsqueeze(1)
        tokens = scaled.argmax(dim=-1)
        rows = [i for i, r in enumerate(requests) if not r.sampling.greedy]
        if rows:
            index = to_device(rows, torch.long, logits.device)
            sampled = self._sample_rows(scaled.index_select(0, index), [requests[i] for i in rows])
            tokens = tokens.index_copy_(0, index, sampled)
        out = SampleOutput(tokens, generation_logits=generation_logits, generation_logit_rows=generation_rows)
        if any(r.sampling.needs_logprobs for r in requests):
            self._logprobs(scaled, requests, out)
        beam_rows = [i for i, r in enumerate(requests) if r.sampling.use_beam_search]
        if beam_rows:
            # Beam search is deterministic: processed logits, no temperature.
            index = to_device(beam_rows, torch.long, logits.device)
            logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)
            width = max(r.sampling.num_sequences for r in requests if r.sampling.use_beam_search)
            num_end_ids = max(len(r.sampling.end_ids) for r in requests if r.sampling.use_beam_search)
            num_top = min(max(2, 1 + num_end_ids) * width, logprobs.shape[-1])
            out.beam_top_logprobs, out.beam_top_ids = logprobs.topk(num_top, dim=-1)
            out.beam_rows = tuple(beam_rows)
        return out

    # ---- stages ------------------------------------------------------------------------
    def _process(self, logits: torch.Tensor, requests: list[LlmRequest], pending: PendingTokens | None) -> None:
        if any(r.sampling.logits_params is not None for r in requests):
            process_logits(
                logits,
                [r.sampling.logits_params or _NOOP for r in requests],
                [r.prompt_token_ids for r in requests],
                [r.output_token_ids for r in requests],
                pending,
            )
        for i, request in enumerate(requests):
            for fn in request.sampling.logits_processors:
                logits[i] = call_logits_processor(fn, request, logits[i])
        guided = [i for i, r in enumerate(requests) if r.grammar is not None]
        if guided:
            backend = self.grammar_backend
            bitmask = backend.allocate_bitmask(len(requests))
            backend.fill_bitmasks([requests[i].grammar for i in guided], bitmask, guided)
            from rtllm.structured import apply_bitmask

            apply_bitmask(logits, bitmask, guided)

    def _sample_rows(self, scaled: torch.Tensor, requests: list[LlmRequest]) -> torch.Tensor:
        """Draw from temperature-scaled logits after top-k, top-p and min-p.

        Each filter only touches the rows that use it: top-p rows are sorted (the
        nucleus needs the order), top-k-only rows take a ``topk`` threshold, the rest
        is a plain softmax.
        """
        device = scaled.device
        vocab = scaled.shape[-1]
        probs = scaled.softmax(dim=-1)
        nucleus = [i for i, r in enumerate(requests) if r.sampling.top_p < 1.0]
        top_k_only = [
            i for i, r in enumerate(requests) if r.sampling.top_p >= 1.0 and 0 < r.sampling.top_k < vocab
        ]
        if top_k_only:
            index = to_device(top_k_only, torch.long, device)
            ks = [requests[i].sampling.top_k for i in top_k_only]
            probs.index_copy_(0, index, top_k_probs(scaled.index_select(0, index), ks))
        if nucleus:
            index = to_device(nucleus, torch.long, device)
            rows = [requests[i] for i in nucleus]
            filtered = filtered_probs(
                scaled.index_select(0, index),
                torch.ones(len(rows), device=device),
                to_device([r.sampling.top_k for r in rows], torch.long, device),
                to_device([r.sampling.top_p for r in rows], torch.float32, device),
            )
            probs.index_copy_(0, index, filtered)
        min_p = [r.sampling.min_p for r in requests]
        if any(min_p):
            probs = apply_min_p(probs, to_device(min_p, torch.float32, device))
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(requests) if r.sampling.seed is not None]
        if len(seeded) < len(requests):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=self._generator_for(requests[i]))
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(scaled: torch.Tensor, requests: list[LlmRequest], out: SampleOutput) -> None:
        """Logprobs of the rows that need them (the other rows of the outputs stay zero)."""
        rows = [i for i, r in enumerate(requests) if r.sampling.needs_logprobs]
        device = scaled.device
        index = to_device(rows, torch.long, device)
        logprobs = torch.log_softmax(scaled.index_select(0, index), dim=-1)
        token_logprob = logprobs.gather(1, out.tokens.index_select(0, index).unsqueeze(1))
        batch = len(requests)
        out.logprobs = torch.zeros(batch, device=device).index_copy_(0, index, token_logprob.squeeze(1))
        ranks = (logprobs > token_logprob).sum(dim=-1) + 1
        out.ranks = torch.zeros(batch, dtype=ranks.dtype, device=device).index_copy_(0, index, ranks)
        num_top = max((requests[i].sampling.num_logprobs or 0) for i in rows)
        if num_top:
            values, ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
            out.top_logprobs = values.new_zeros(batch, values.shape[1]).index_copy_(0, index, values)
            out.top_ids = ids.new_zeros(batch, ids.shape[1]).index_copy_(0, index, ids)

    def _generator_for(self, request: LlmRequest) -> torch.Generator:
        if request.sampling.seed is None:
            return self.generator
        if request.generator is None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        return request.generator

    @staticmethod
    def filtered_probs(logits: torch.Tensor, requests: list[LlmRequest]) -> torch.Tensor:
        """Probabilities after temperature, top-k and top-p (zero outside the allowed set)."""
        device = logits.device
        vocab = logits.shape[-1]
        top_k = [r.sampling.top_k for r in requests]
        top_p = [r.sampling.top_p for r in requests]
        return filtered_probs(
            logits,
            to_device([r.sampling.temperature for r in requests], torch.float32, device),
            to_device(top_k, torch.long, device),
            to_device(top_p, torch.float32, device),
            apply_filters=any(0 < k < vocab for k in top_k) or min(top_p) < 1.0,
        )
