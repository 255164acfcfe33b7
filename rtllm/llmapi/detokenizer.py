"""Incremental (streaming) detokenization of generated token ids.

The executor calls :meth:`IncrementalDetokenizer.add_tokens` after every engine step
with the tokens a request just produced and gets back the newly *stable* text.

Technique (prefix offset / read offset, as in TGI and vLLM): the token ids live in one
logical sequence ``context + generated`` where ``context`` is the last few prompt
tokens. Two offsets index into it:

* ``prefix_offset``: start of the decode window. Tokens before it are never decoded
  again. The window starts a little *before* the text we still have to produce, so the
  tokenizer's decoder sees the token in its real surroundings: SentencePiece/Metaspace
  decoders strip the leading space of the *first* token they decode, and byte-level or
  byte-fallback decoders need all the bytes of a character at once.
* ``read_offset``: every token before it has been turned into emitted text.

Each step decodes ``ids[prefix:]`` (``new_text``) and ``ids[prefix:read]``
(``prefix_text``); the delta is ``new_text[len(prefix_text):]``. Because both strings
start at the same token, whatever the decoder does to the first token of the window
cancels out. The delta is held back while ``new_text`` ends with U+FFFD, the marker
of a UTF-8 character whose bytes have not all been generated yet. Only a handful of
tokens are decoded per step, so the cost per step does not grow with the output length.

Resulting invariant (checked by the tests): the concatenation of all deltas returned by
``add_tokens`` and ``flush`` equals ``decode(ctx + gen)[len(decode(ctx)):]`` with
``clean_up_tokenization_spaces=False``. For byte-level BPE tokenizers, and for any
tokenizer when the prompt is empty, this is exactly ``tokenizer.decode(gen)``; for
SentencePiece-style tokenizers after a non-empty prompt it differs only in keeping the
first generated token's leading space, which ``decode(gen)`` alone would strip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["INITIAL_CONTEXT_TOKENS", "IncrementalDetokenizer"]

#: How many trailing prompt tokens are kept as decode context for the first
#: generated token (enough for the leading-space decision and for a few byte tokens).
INITIAL_CONTEXT_TOKENS = 5

#: A UTF-8 character has at most 4 bytes, so at most 3 trailing tokens can hold an
#: incomplete one; used to find a stable sub-window when several tokens arrive at once.
_MAX_INCOMPLETE_TOKENS = 3

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into a stream of text deltas.

    Args:
        tokenizer: A Hugging Face tokenizer (fast tokenizers use their Rust backend
            directly; slow ones fall back to ``tokenizer.decode``).
        prompt_token_ids: The request's prompt ids; only the last
            :data:`INITIAL_CONTEXT_TOKENS` are kept, as decode context.
        skip_special_tokens: Drop special tokens from the text, like
            ``tokenizer.decode(..., skip_special_tokens=True)``.
        spaces_between_special_tokens: Forwarded to slow tokenizers' ``decode``; fast
            tokenizers ignore it (their Rust decoder fixes the spacing), exactly as
            ``PreTrainedTokenizerFast.decode`` does.
    """

    __slots__ = (
        "_backend",
        "_chunks",
        "_ctx",
        "_gen",
        "_prefix_offset",
        "_prefix_text",
        "_read_offset",
        "_skip_special_tokens",
        "_spaces_between_special_tokens",
        "_text",
        "_tokenizer",
    )

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        # The Rust tokenizer's decode is what PreTrainedTokenizerFast.decode calls, minus
        # the Python overhead and the optional clean-up pass (which is not prefix-stable
        # and therefore can never be applied to a stream).
        self._backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        # Logical id sequence = _ctx + _gen; offsets index into it. _ctx never changes.
        self._gen: list[int] = []
        self._ctx, ctx_text = self._initial_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ctx)
        # Cached decode of ids[prefix_offset:read_offset]; None when offsets moved.
        self._prefix_text: str | None = ctx_text
        self._chunks: list[str] = []
        self._text: str | None = ""  # joined _chunks, rebuilt lazily

    # ------------------------------------------------------------------ public API

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far (the live list: callers must not mutate it)."""
        return self._gen

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        if self._text is None:
            self._text = "".join(self._chunks)
            # Collapse the chunks so later joins only touch new deltas.
            self._chunks = [self._text]
        return self._text

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append generated tokens and return the newly stable text (may be ``""``).

        Text ending in an incomplete UTF-8 character is held back until the character
        is complete (or :meth:`flush` is called).
        """
        if not new_token_ids:
            return ""
        self._gen.extend(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return all held-back text (call once the request has finished).

        After this the emitted text is exact even if the output ends in the middle of a
        character; such a trailing fragment decodes to U+FFFD, as in ``decode``.
        """
        return self._advance(final=True)

    # --------------------------------------------------------------- internals

    def _initial_context(self, prompt_token_ids: list[int]) -> tuple[list[int], str]:
        """The prompt tail used as decode context, and its text.

        The window must start on a character boundary: byte-fallback decoders validate
        a run of byte tokens as a whole, so stray continuation bytes at the window start
        would turn the first generated character into U+FFFD as well. A leading U+FFFD
        means the tail starts inside a character: widen it (a UTF-8 character spans at
        most 4 tokens, so 3 extra tokens always suffice for real text).
        """
        n = min(len(prompt_token_ids), INITIAL_CONTEXT_TOKENS)
        limit = min(len(prompt_token_ids), INITIAL_CONTEXT_TOKENS + _MAX_INCOMPLETE_TOKENS)
        while True:
            ctx = list(prompt_token_ids[len(prompt_token_ids) - n :])
            text = self._decode(ctx)
            if n >= limit or not text.startswith(_REPLACEMENT_CHAR):
                return ctx, text
            n += 1

    def _num_ids(self) -> int:
        return len(self._ctx) + len(self._gen)

    def _window(self, start: int, stop: int) -> list[int]:
        """ids[start:stop] of the logical sequence ``_ctx + _gen``."""
        n_ctx = len(self._ctx)
        if start >= n_ctx:
            return self._gen[start - n_ctx : stop - n_ctx]
        return self._ctx[start:stop] + self._gen[: max(stop - n_ctx, 0)]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _emit(self, delta: str, new_read_offset: int) -> str:
        # The tokens just turned into text become the next window's context.
        self._prefix_offset = self._read_offset
        self._read_offset = new_read_offset
        self._prefix_text = None
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta

    def _advance(self, final: bool) -> str:
        end = self._num_ids()
        read = self._read_offset
        if read >= end:
            return ""
        prefix = self._prefix_offset
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode(self._window(prefix, read))
        n_prefix = len(prefix_text)
        new_text = self._decode(self._window(prefix, end))
        # Stable when it grew and does not end in a partial character. If it did not
        # grow (e.g. only skipped special tokens arrived) the offsets stay put: moving
        # the window start past them would lose the leading-space context.
        if final or (len(new_text) > n_prefix and not new_text.endswith(_REPLACEMENT_CHAR)):
            return self._emit(new_text[n_prefix:], end)
        # Several tokens arrived and the last ones hold a partial character: emit the
        # text of the leading tokens now instead of holding all of them back.
        for stop in range(end - 1, max(read, end - 1 - _MAX_INCOMPLETE_TOKENS), -1):
            text = self._decode(self._window(prefix, stop))
            if len(text) > n_prefix and not text.endswith(_REPLACEMENT_CHAR):
                return self._emit(text[n_prefix:], stop)
        return ""
