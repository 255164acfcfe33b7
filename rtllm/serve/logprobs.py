"""OpenAI ``logprobs`` objects built from the engine's per-token :class:`Logprob` dicts.

The engine gives, per generated token, a dict ``{token_id: Logprob(logprob, rank)}``
whose first entry is the generated token, followed by the ``k`` likeliest tokens of
that step (ranks 1..k; the generated token appears once, first, even when it is one of
them). The values are log-probabilities of the distribution the token was sampled from
before top-k/top-p/min-p truncation (see :mod:`rtllm.engine.logprobs`).

Conventions, as in vLLM's OpenAI server:

- A token's string is ``tokenizer.decode([token_id])`` with special tokens kept (so an
  EOS that ended the output shows as e.g. ``"</s>"``). A token holding part of a
  multi-byte character decodes to U+FFFD; its exact UTF-8 bytes are in the chat
  format's ``bytes`` (taken from the byte-level BPE alphabet or a ``<0xNN>``
  byte-fallback token). Without a tokenizer the string is ``"token_id:<id>"``.
- ``-inf`` (a token the step could not produce, e.g. masked by a grammar) is reported as
  ``-9999.0``, because JSON has no infinity.
- ``text_offset`` (completions) counts characters of the concatenated token strings,
  starting at the length of the echoed prompt if any; it follows the choice's ``text``
  except where a token splits a character or a stop string was cut from the text.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from rtllm.executor.result import Logprob, TokenLogprobs
from rtllm.serve.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
)

LOGPROB_FLOOR = -9999.0
"""What ``-inf`` (and NaN) logprobs are reported as."""

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable stand-in character -> its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + shift)
            shift += 1
    return {char: byte for byte, char in chars.items()}


def clamp(value: float) -> float:
    """``value`` as a JSON-safe float (``-inf``, and NaN, become :data:`LOGPROB_FLOOR`)."""
    value = float(value)
    return value if math.isfinite(value) else LOGPROB_FLOOR


class TokenStrings:
    """Token ids -> the strings and UTF-8 bytes shown in logprobs (cached per id)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        tokenizer = self._tokenizer
        if tokenizer is None:
            name = f"token_id:{token_id}"
            return name, list(name.encode())
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text, list(text.encode())
        return text, self._raw_bytes(token_id, text)

    def _raw_bytes(self, token_id: int, text: str) -> list[int]:
        """The bytes of a token that decodes to U+FFFD (part of a multi-byte character)."""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece:
            match = _BYTE_TOKEN.fullmatch(piece)
            if match is not None:
                return [int(match.group(1), 16)]
            decoder = _byte_level_decoder()
            if all(char in decoder for char in piece):
                raw = bytes(decoder[char] for char in piece)
                if raw.decode("utf-8", errors="replace") == text:
                    return list(raw)
        return list(text.encode())

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """``(string, utf-8 bytes)`` of ``token_id``."""
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def text(self, token_id: int) -> str:
        """The string of ``token_id``."""
        return self.get(token_id)[0]


def _chosen(entry: dict[int, Logprob]) -> tuple[int, Logprob]:
    return next(iter(entry.items()))


def completion_logprobs(
    entries: TokenLogprobs, strings: TokenStrings, text_offset: int = 0
) -> tuple[CompletionLogprobs, int]:
    """The ``/v1/completions`` logprobs of ``entries`` and the text offset after them.

    ``top_logprobs[j]`` holds every entry of the engine's dict: the generated token and
    the ``k`` likeliest (up to ``k + 1`` strings; two ids with the same string keep the
    first one's value).
    """
    out = CompletionLogprobs()
    for entry in entries:
        token_id, chosen = _chosen(entry)
        token = strings.text(token_id)
        top: dict[str, float] = {}
        for top_id, logprob in entry.items():
            top.setdefault(strings.text(top_id), clamp(logprob.logprob))
        out.tokens.append(token)
        out.token_logprobs.append(clamp(chosen.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out, text_offset


def echo_logprobs(
    prompt_token_ids: list[int], entries: list[dict[int, Logprob] | None] | None, strings: TokenStrings
) -> tuple[CompletionLogprobs, int]:
    """The ``/v1/completions`` logprobs of an echoed prompt (``echo`` with ``logprobs``).

    ``entries`` are the engine's prompt logprobs, aligned to the end of the prompt; a
    token without one (the first) has None as its logprob and top logprobs, as in OpenAI.
    Returns the object and the text offset after the prompt.
    """
    entries = entries or []
    aligned = [None] * max(0, len(prompt_token_ids) - len(entries)) + list(entries)
    out = CompletionLogprobs()
    offset = 0
    for token_id, entry in zip(prompt_token_ids, aligned[-len(prompt_token_ids):], strict=True):
        token = strings.text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        own = None if entry is None else entry.get(token_id)
        out.token_logprobs.append(None if own is None else clamp(own.logprob))
        top = None
        if entry is not None:
            top = {}
            for top_id, logprob in entry.items():
                top.setdefault(strings.text(top_id), clamp(logprob.logprob))
        out.top_logprobs.append(top)
    return out, offset


def concat(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    """``first`` followed by ``second`` (a new object)."""
    return CompletionLogprobs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )


def _chat_top(token_id: int, logprob: Logprob, strings: TokenStrings) -> ChatTopLogprob:
    text, raw = strings.get(token_id)
    return ChatTopLogprob(token=text, logprob=clamp(logprob.logprob), bytes=raw)


def chat_logprobs(entries: TokenLogprobs, strings: TokenStrings, num_top: int) -> ChatLogprobs:
    """The ``/v1/chat/completions`` logprobs of ``entries``.

    ``top_logprobs`` lists the ``num_top`` likeliest tokens by rank, which includes the
    generated token only when it is one of them.
    """
    content = []
    for entry in entries:
        token_id, chosen = _chosen(entry)
        ranked = sorted(
            (logprob.rank, top_id)
            for top_id, logprob in entry.items()
            if logprob.rank is not None and logprob.rank <= num_top
        )
        text, raw = strings.get(token_id)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=clamp(chosen.logprob),
                bytes=raw,
                top_logprobs=[_chat_top(top_id, entry[top_id], strings) for _, top_id in ranked],
            )
        )
    return ChatLogprobs(content=content)


def prompt_logprobs(
    entries: list[dict[int, Logprob] | None] | None, num_prompt_tokens: int, strings: TokenStrings
) -> list[dict[int, PromptLogprob] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token a dict (the token first, then the top
    ones), None for the first token (nothing precedes it).

    Entries are aligned to the end of the prompt, so an engine that leaves out the first
    token's None still lines up.
    """
    if entries is None:
        return None
    padding: list[dict[int, PromptLogprob] | None] = [None] * max(0, num_prompt_tokens - len(entries))
    return padding + [
        None if entry is None else {
            token_id: PromptLogprob(
                logprob=clamp(logprob.logprob), rank=logprob.rank, decoded_token=strings.text(token_id)
            )
            for token_id, logprob in entry.items()
        }
        for entry in entries
    ]
