"""Log-probabilities of sampled tokens and of each step's likeliest tokens.

rtllm reports logprobs of the distribution a token is sampled from *before truncation*:
after logits processing (:func:`rtllm.engine.logits_processors.process_logits`) and
temperature, before top-k, top-p and min-p. Every token not banned then has a finite
logprob, and truncation does not renormalise a sampled token's logprob.
"""

from __future__ import annotations

import torch


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and of each row's ``num_top`` likeliest.

    Pass the logits after logits processing and temperature (unscaled for greedy rows,
    whose temperature is 0) but before top-k, top-p and min-p: see the module docstring.

    Args:
        logits: ``[B, V]`` logits.
        token_ids: ``[B]`` chosen token per row.
        num_top: How many top tokens to return per row (0 <= num_top <= V).

    Returns:
        ``token_logprob`` ``[B]`` float32, ``top_ids`` ``[B, num_top]`` long and
        ``top_logprobs`` ``[B, num_top]`` float32, in decreasing order of logprob.
    """
    if logits.dim() != 2 or token_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits [B, V] and token_ids [B], got {tuple(logits.shape)} and "
            f"{tuple(token_ids.shape)}"
        )
    if not 0 <= num_top <= logits.shape[1]:
        raise ValueError(f"num_top must be in [0, {logits.shape[1]}], got {num_top!r}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logprob = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    return token_logprob, top_ids, top_logprobs


def prompt_token_logprobs(
    context_logits: torch.Tensor, prompt_ids: list[int], num_top: int
) -> tuple[list[float], list[int], list[list[tuple[int, float]]]]:
    """Logprobs of prompt tokens 1..n-1, each from the raw logits of the position before it
    (no temperature or penalties: those belong to sampling, not to scoring the prompt).

    Returns host lists: each token's logprob, its rank, and its ``num_top`` likeliest
    alternatives as ``(token_id, logprob)``.
    """
    if len(prompt_ids) < 2:
        return [], [], []
    logprobs = torch.log_softmax(context_logits[: len(prompt_ids) - 1].float(), dim=-1)
    targets = torch.tensor(prompt_ids[1:], device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, targets)
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top: list[list[tuple[int, float]]] = [[] for _ in prompt_ids[1:]]
    if num_top:
        values, ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
        top = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return chosen.squeeze(1).tolist(), ranks.tolist(), top
