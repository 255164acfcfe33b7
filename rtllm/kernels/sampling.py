"""Batched sampling fully on the device: no host synchronisation.

:func:`sample_tokens` does what :class:`rtllm.engine.sampler.Sampler` does (greedy
rows take an argmax; the other rows get temperature, top-k and top-p and one draw by
the exponential race ``argmax(p / q)``, ``q ~ Exp(1)``), but with per-row parameter
*tensors*, so it never calls ``.item()``/``.tolist()`` and never branches on data:
it can run inside a CUDA graph and lets the host queue the next step before this
one's tokens are known. The operations (and their order) are those of
``Sampler.filtered_probs``, so given the same noise a row gets the same token.

This is plain PyTorch: the expensive part is the sort for top-k/top-p, which a
Triton kernel would not beat without a different (rejection-sampling) algorithm.
Callers that know on the host that no row filters can pass ``apply_filters=False``
to skip the sort.
"""

from __future__ import annotations

import torch


def _check_inputs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    greedy_mask: torch.Tensor,
    noise: torch.Tensor | None,
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got {tuple(logits.shape)}")
    batch = logits.shape[0]
    for name, t in (
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("greedy_mask", greedy_mask),
    ):
        if t.shape != (batch,):
            raise ValueError(f"{name} must be [{batch}], got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if not temperature.is_floating_point() or not top_p.is_floating_point():
        raise ValueError("temperature and top_p must be floating point")
    if top_k.is_floating_point() or top_k.dtype == torch.bool:
        raise ValueError(f"top_k must be an integer tensor, got {top_k.dtype}")
    if greedy_mask.dtype != torch.bool:
        raise ValueError(f"greedy_mask must be bool, got {greedy_mask.dtype}")
    if noise is not None:
        if noise.shape != logits.shape:
            raise ValueError(f"noise must be {tuple(logits.shape)}, got {tuple(noise.shape)}")
        if noise.device != logits.device:
            raise ValueError(f"noise is on {noise.device}, logits on {logits.device}")


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


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    greedy_mask: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    apply_filters: bool = True,
) -> torch.Tensor:
    """One token per row of ``logits``, entirely on ``logits``'s device.

    Args:
        logits: ``[batch, vocab]`` (any float dtype; computed in float32).
        temperature: float ``[batch]``; values of greedy rows are ignored.
        top_k: integer ``[batch]``; ``0`` (or ``>= vocab``) disables it.
        top_p: float ``[batch]`` in ``(0, 1]``; ``1`` disables it.
        greedy_mask: bool ``[batch]``; ``True`` rows take ``argmax(logits)``.
        noise: ``[batch, vocab]`` draws of ``Exp(1)`` (per-request generators are the
            caller's business); ``None`` draws it here from ``generator``.
        generator: used only when ``noise`` is ``None``.
        apply_filters: ``False`` skips top-k/top-p (see :func:`filtered_probs`).

    Returns:
        int64 token ids ``[batch]`` on ``logits``'s device.
    """
    _check_inputs(logits, temperature, top_k, top_p, greedy_mask, noise)
    greedy_ids = logits.argmax(dim=-1)
    # Greedy rows may carry temperature 0: sample them at 1 so nothing overflows.
    temperature = torch.where(greedy_mask, 1.0, temperature.float())
    probs = filtered_probs(logits, temperature, top_k, top_p, apply_filters=apply_filters)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    sampled_ids = (probs / noise).argmax(dim=-1)
    return torch.where(greedy_mask, greedy_ids, sampled_ids)


def sample_tokens_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    greedy_mask: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Row-by-row reference of :func:`sample_tokens` (host loop; for tests only)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    vocab = logits.shape[-1]
    for i in range(logits.shape[0]):
        row = logits[i].float()
        if bool(greedy_mask[i]):
            out[i] = row.argmax()
            continue
        row = row / max(float(temperature[i]), 1e-6)
        k, p = int(top_k[i]), float(top_p[i])
        order = row.argsort(descending=True)
        keep = torch.zeros(vocab, dtype=torch.bool, device=row.device)
        keep[order[: k if 0 < k < vocab else vocab]] = True
        if p < 1.0:
            probs = row.masked_fill(~keep, float("-inf")).softmax(-1)[order]
            before = probs.cumsum(-1) - probs
            keep[order[before >= p]] = False
        probs = row.masked_fill(~keep, float("-inf")).softmax(-1)
        out[i] = (probs / noise[i]).argmax()
    return out
