"""Benchmark datasets: JSON-lines files or synthetic random-token requests.

A JSON-lines dataset has one object per line, either ``{"prompt": "text"}`` or
``{"input_ids": [1, 2, 3]}``, optionally with ``"output_tokens"`` (or its alias
``"max_tokens"``), the number of tokens to generate. Other keys (``task_id``, ...)
are ignored; blank lines are skipped.

A synthetic dataset draws prompt token ids uniformly from the vocabulary (leaving
out special ids) with a seeded generator, so the same arguments always give the
same requests. Every request has ``ignore_eos=True`` (see
:meth:`BenchRequest.sampling_params`), so output lengths are exact.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

from rtllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One benchmark request.

    Attributes:
        output_tokens: Tokens to generate (exact: EOS is ignored).
        input_ids: Prompt token ids, or None for a text prompt.
        prompt: Prompt text, or None for a token-id prompt.
    """

    output_tokens: int
    input_ids: tuple[int, ...] | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if (self.input_ids is None) == (self.prompt is None):
            raise ValueError("a benchmark request needs exactly one of input_ids and prompt")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")

    @property
    def inputs(self) -> str | list[int]:
        """The prompt in the form :meth:`rtllm.LLM.generate_async` takes."""
        return self.prompt if self.prompt is not None else list(self.input_ids or ())

    def sampling_params(self) -> SamplingParams:
        """Greedy sampling of exactly ``output_tokens`` tokens (``ignore_eos=True``)."""
        return SamplingParams(max_tokens=self.output_tokens, ignore_eos=True)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_jsonl_line(
    line: str, location: str, default_output_tokens: int | None = None
) -> BenchRequest:
    """Parse one dataset line; ``location`` (``path:line``) prefixes every error."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{location}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{location}: expected a JSON object, got {type(item).__name__}")
    has_prompt, has_ids = "prompt" in item, "input_ids" in item
    if has_prompt == has_ids:
        raise ValueError(f"{location}: needs exactly one of 'prompt' and 'input_ids'")
    output_tokens = item.get("output_tokens", item.get("max_tokens", default_output_tokens))
    if output_tokens is None:
        raise ValueError(
            f"{location}: no 'output_tokens' (or 'max_tokens') and no default output length "
            "(pass --output-len)"
        )
    if not _positive_int(output_tokens):
        raise ValueError(f"{location}: 'output_tokens' must be a positive integer, got {output_tokens!r}")
    if has_prompt:
        prompt = item["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{location}: 'prompt' must be a non-empty string")
        return BenchRequest(output_tokens=output_tokens, prompt=prompt)
    ids = item["input_ids"]
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise ValueError(f"{location}: 'input_ids' must be a non-empty list of non-negative integers")
    return BenchRequest(output_tokens=output_tokens, input_ids=tuple(ids))


def load_jsonl_dataset(
    path: str,
    default_output_tokens: int | None = None,
    num_requests: int | None = None,
) -> list[BenchRequest]:
    """Read a JSON-lines dataset.

    Args:
        path: The file.
        default_output_tokens: Output length of lines without ``output_tokens``;
            None makes such lines an error.
        num_requests: Keep only the first ``num_requests`` requests (all when None).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a malformed line (the message gives ``path:line``) or an
            empty dataset.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {path!r} does not exist")
    requests: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if num_requests is not None and len(requests) >= num_requests:
                break
            if not line.strip():
                continue
            requests.append(parse_jsonl_line(line, f"{path}:{lineno}", default_output_tokens))
    if not requests:
        raise ValueError(f"dataset {path!r} has no requests")
    if num_requests is not None and len(requests) < num_requests:
        logger.warning("dataset %s has %d requests, fewer than the %d asked for", path, len(requests), num_requests)
    return requests


def _draw_lengths(rng: random.Random, count: int, mean: int, std: float) -> list[int]:
    if std <= 0:
        return [mean] * count
    return [max(1, round(rng.gauss(mean, std))) for _ in range(count)]


def synthetic_dataset(
    num_requests: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    *,
    input_len_std: float = 0.0,
    output_len_std: float = 0.0,
    seed: int = 0,
    exclude_ids: Iterable[int] = (),
) -> list[BenchRequest]:
    """Random-token requests of (optionally normal-distributed) lengths.

    Lengths are ``input_len``/``output_len`` exactly when their std is 0, else drawn
    from a normal distribution, rounded and clipped to >= 1. Token ids are uniform
    over ``[0, vocab_size)`` minus ``exclude_ids`` (special tokens). The same
    arguments always give the same dataset.
    """
    for name, value in (("num_requests", num_requests), ("input_len", input_len),
                        ("output_len", output_len), ("vocab_size", vocab_size)):
        if not _positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if input_len_std < 0 or output_len_std < 0:
        raise ValueError("input_len_std and output_len_std must be >= 0")
    excluded = {t for t in exclude_ids if 0 <= t < vocab_size}
    allowed = [t for t in range(vocab_size) if t not in excluded] if excluded else None
    if allowed is not None and not allowed:
        raise ValueError("every token id of the vocabulary is excluded")
    rng = random.Random(seed)
    input_lens = _draw_lengths(rng, num_requests, input_len, input_len_std)
    output_lens = _draw_lengths(rng, num_requests, output_len, output_len_std)
    requests = []
    for in_len, out_len in zip(input_lens, output_lens, strict=True):
        if allowed is None:
            ids = tuple(rng.randrange(vocab_size) for _ in range(in_len))
        else:
            ids = tuple(allowed[rng.randrange(len(allowed))] for _ in range(in_len))
        requests.append(BenchRequest(output_tokens=out_len, input_ids=ids))
    return requests


def dataset_stats(requests: list[BenchRequest]) -> dict[str, float | int | None]:
    """Request count and mean/max lengths (input lengths only for token-id prompts)."""
    ids_lens = [len(r.input_ids) for r in requests if r.input_ids is not None]
    out_lens = [r.output_tokens for r in requests]
    return {
        "num_requests": len(requests),
        "num_text_prompts": sum(r.prompt is not None for r in requests),
        "mean_input_len": sum(ids_lens) / len(ids_lens) if ids_lens else None,
        "max_input_len": max(ids_lens) if ids_lens else None,
        "mean_output_len": sum(out_lens) / len(out_lens) if out_lens else None,
        "max_output_len": max(out_lens) if out_lens else None,
    }
