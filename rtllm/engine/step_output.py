"""What a step hands back: sampled tokens on their way to the host, and per-request updates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rtllm.engine.llm_request import FinishReason, LlmRequest
from rtllm.engine.sampler import SampleOutput


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs of one generated token: its own, its rank (1 = likeliest) and the top ones."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestUpdate:
    """What one step produced for one request."""

    request_id: int
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked for
    cumulative_logprob: float | None = None  # running sum, when logprobs are computed
    generation_logits: torch.Tensor | None = None  # [len(new_token_ids), vocab] on the host
    prompt_logprobs: list[Any] | None = None  # set once, with the first token
    context_logits: torch.Tensor | None = None  # [prompt_len, vocab] on the host, first token
    client_id: int | None = None  # the client's request id (None: same as request_id)
    seq_index: int = 0  # which of the client request's sequences (n > 1)

    @property
    def client_request_id(self) -> int:
        return self.request_id if self.client_id is None else self.client_id


@dataclass(slots=True)
class LaunchedStep:
    """A step whose sampled tokens (and logprobs) may still be on the device."""

    requests: list[LlmRequest]  # the requests that sampled, in row order
    sample: SampleOutput
    row_of: dict[int, int] = field(default_factory=dict)  # request id -> row
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # pinned copies
    copied: torch.cuda.Event | None = None

    @property
    def tokens(self) -> torch.Tensor:
        return self.sample.tokens

    def start_copy(self) -> None:
        """Queue the device-to-host copies right behind the sampling kernels, so the
        commit waits for this step only, not for steps launched after it."""
        if not self.sample.tokens.is_cuda:
            return
        for name, tensor in self.sample.tensors().items():
            self.host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host[name].copy_(tensor, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def host_outputs(self) -> dict[str, Any]:
        """The step's outputs on the host: lists, except logits (CPU tensors)."""
        if self.copied is not None:
            self.copied.synchronize()
            tensors = self.host
        else:
            tensors = self.sample.tensors()
        return {
            name: tensor.cpu() if name == "generation_logits" else tensor.tolist()
            for name, tensor in tensors.items()
        }

    def token_logprobs(self, outputs: dict[str, Any], row: int, token: int, num_top: int) -> TokenLogprobs:
        top: list[tuple[int, float]] = []
        if num_top:
            top = list(zip(outputs["top_ids"][row][:num_top], outputs["top_logprobs"][row][:num_top], strict=True))
        return TokenLogprobs(token, outputs["logprobs"][row], outputs["ranks"][row], top)
