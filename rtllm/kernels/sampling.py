"""Batched sampling filters on the device, with per-row parameter tensors.

:func:`filtered_probs` applies temperature, top-k and top-p to a whole batch as
tensor operations, never calling ``.item()``/``.tolist()`` or branching on data,
so :class:`rtllm.engine.sampler.Sampler` can launch a step's sampling without
waiting for the device. Plain PyTorch: the expensive part is the sort for
top-k/top-p, which a Triton kernel would not beat without a different
(rejection-sampling) algorithm. Callers that know on the host that no row filters
pass ``apply_filters=False`` to skip the sort.
"""

from __future__ import annotations

import torch


def filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    *,
    apply_filters: bool = True,
) -> torch.Tensor:
    """Float32 probabilities after temperature, top-k and top-p (zero outside the kept set).

    Same math as ``Sampler.filtered_probs``: ``top_k`` outside ``(0, vocab)`` keeps the
    whole vocabulary; ``top_p`` keeps the smallest prefix (by descending probability
    after top-k) whose mass reaches it, and a row with ``top_p >= 1`` is not touched.
    ``apply_filters=False`` skips top-k and top-p (only valid if no row uses them).
    """
    logits = logits.float()
    logits = logits / temperature.float().clamp(min=1e-6).unsqueeze(1)
    if not apply_filters:
        return logits.softmax(dim=-1)
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab).unsqueeze(1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = ranks >= k
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    p = top_p.float().unsqueeze(1)
    drop |= (mass_before >= p) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits.softmax(dim=-1)
