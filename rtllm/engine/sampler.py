"""Batched sampling: logits of the step's sampled rows -> next token ids.

Greedy rows take an argmax. The other rows get temperature, top-k and top-p as
whole-batch tensor operations, then one draw each by the exponential race
(``argmax(p / q)`` with ``q ~ Exp(1)``, which samples from ``p``). A request
with a ``seed`` draws its noise from its own generator, so its tokens do not
depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from rtllm.engine.llm_request import LlmRequest
from rtllm.kernels.sampling import filtered_probs
from rtllm.runtime.transfer import to_device


class Sampler:
    """Samples one token per row of a logits matrix."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: list[LlmRequest]) -> list[int]:
        """Sample a token for each row of ``logits`` ``[len(requests), vocab]``."""
        return self.sample_async(logits, requests).tolist()

    def sample_async(self, logits: torch.Tensor, requests: list[LlmRequest]) -> torch.Tensor:
        """Like :meth:`sample` but returns the token ids as a device tensor, without
        waiting for the device: the overlap loop reads them one step later."""
        if all(r.sampling.greedy for r in requests):
            return logits.argmax(dim=-1)
        logits = logits.float()
        token_ids = logits.argmax(dim=-1)
        rows = [i for i, r in enumerate(requests) if not r.sampling.greedy]
        index = to_device(rows, torch.long, logits.device)
        sampled = self._sample_rows(logits.index_select(0, index), [requests[i] for i in rows])
        return token_ids.index_copy_(0, index, sampled)

    def _sample_rows(self, logits: torch.Tensor, requests: list[LlmRequest]) -> torch.Tensor:
        probs = self.filtered_probs(logits, requests)
        noise = torch.empty_like(probs)
        for i, request in enumerate(requests):
            noise[i].exponential_(generator=self._generator_for(request))
        return (probs / noise).argmax(dim=-1)

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
