"""Perplexity of an rtllm causal LM on a token sequence (plain PyTorch forward).

The sequence is cut into consecutive non-overlapping windows of ``window`` tokens;
each window is an independent context (no carried-over history), and every token but
the first of a window is predicted. Perplexity is ``exp`` of the mean negative
log-likelihood over all predicted tokens, computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rtllm.quantization.calibration import dense_forward


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, window: int = 1024) -> float:
    """Perplexity of ``model`` on ``token_ids`` ``[N]`` (see the module docstring)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise ValueError("token_ids must be a 1-D tensor of at least 2 tokens")
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for start in range(0, token_ids.numel() - 1, window):
        ids = token_ids[start : start + window].to(device)
        if ids.numel() < 2:
            break
        logits = dense_forward(model, ids)
        nll = F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")
        total_nll += float(nll)
        count += ids.numel() - 1
    return math.exp(total_nll / count)
