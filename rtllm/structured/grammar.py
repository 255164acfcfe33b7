"""Grammar-constrained decoding with xgrammar: compile guides, track requests, mask logits.

One :class:`GrammarBackend` per model (tokenizer + logits width) compiles
:class:`~rtllm.structured.params.GuidedDecodingParams` and hands out a
:class:`RequestGrammar` per request. Each decoding step then:

1. ``grammar.fill_bitmask(bitmask, row)`` for each constrained request (host, CPU);
2. :func:`~rtllm.structured.bitmask.apply_bitmask` sets the disallowed logits of those rows to ``-inf``, with one
   host->device copy of the bitmask;
3. after sampling, ``grammar.accept(token_id)`` advances the request's matcher.

Termination: a matcher's *stop tokens* (the backend's ``stop_token_ids``, by default the
tokenizer's EOS, or a per-request override) are masked out until the output so far is a
complete match of the grammar. From then on they are allowed, and they are the *only*
tokens allowed once the grammar cannot continue (e.g. after the closing ``}`` of a JSON
object). Accepting a stop token terminates the matcher (``is_terminated``); after that
:meth:`RequestGrammar.fill_bitmask` allows only the stop tokens and :meth:`RequestGrammar.accept`
takes further stop tokens (for ``ignore_eos`` runs) and rejects anything else. An engine
that stops a request for another reason (``max_tokens``, a stop string) before termination
gets an output that need not match the grammar.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from rtllm.structured.bitmask import allocate_bitmask, clear_bit, set_bit
from rtllm.structured.params import GuidedDecodingParams

_JSON_OBJECT_SCHEMA = '{"type":"object"}'
# xgrammar 0.2.8 (mlc-ai/xgrammar#800, fix pending in #880) compiles a JSON string with
# minLength/maxLength to `"` [^"\\\r\n]{m,n} `"`, which admits raw U+0000-U+001F (tab
# included) that JSON forbids inside strings. For such schemas the mask is ANDed with one
# that bans every token holding a raw control byte other than \n and \r (both stay legal
# as whitespace between elements; a tab as whitespace is given up, never required).
_LENGTH_BOUND = re.compile(r'"(minLength|maxLength)"')
_JSON_CONTROL = re.compile(rb"[\x00-\x09\x0b\x0c\x0e-\x1f]")
_KIND_WHAT = {
    "json": "JSON schema",
    "json_object": "JSON object guide",
    "regex": "regex",
    "grammar": "EBNF grammar",
}
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and, for failed
# checks, "Check failed: (cond) is false: "; neither helps the user.
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def _clean_error(exc: BaseException) -> str:
    return _CPP_PREFIX.sub("", str(exc)).strip()


def _special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special/control tokens (BOS, chat markers, EOS...).

    xgrammar decodes every token of a byte-level vocabulary to its text, so without this
    ``<|im_start|>`` would be allowed *as literal text* inside a JSON string and later be
    dropped by ``skip_special_tokens`` detokenization.
    """
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def build_tokenizer_info(
    tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]
) -> xgr.TokenizerInfo:
    """Build xgrammar's view of a Hugging Face tokenizer for a model with ``vocab_size`` logits.

    The vocabulary type (byte-level, byte-fallback, raw) and ``add_prefix_space`` are
    detected by xgrammar; the vocabulary is then rebuilt with every special token's text
    blanked, which makes xgrammar classify it as special, i.e. never allowed by a grammar
    (stop tokens stay allowed at the end). Ids in ``[len(tokenizer), vocab_size)`` (padded
    logits) are special too; tokenizer ids ``>= vocab_size`` are dropped.
    """
    detected = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
    )
    encoded: list[str] = [""] * vocab_size
    for text, token_id in tokenizer.get_vocab().items():
        if 0 <= token_id < vocab_size:
            encoded[token_id] = text
    for token_id in _special_token_ids(tokenizer):
        if 0 <= token_id < vocab_size:
            encoded[token_id] = ""
    return xgr.TokenizerInfo(
        encoded,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=detected.add_prefix_space,
    )


class RequestGrammar:
    """The grammar state of one request (wraps an ``xgrammar.GrammarMatcher``).

    Not thread-safe; a request's steps are sequential anyway. Create with
    :meth:`GrammarBackend.new_matcher`.
    """

    def __init__(
        self,
        matcher: xgr.GrammarMatcher,
        params: GuidedDecodingParams,
        vocab_size: int,
        extra_mask: torch.Tensor | None = None,
        never: frozenset[int] = frozenset(),
    ) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._stop_token_ids = tuple(matcher.stop_token_ids)
        # Stop tokens accepted after termination (ignore_eos); xgrammar's history does not
        # hold them, so rollback() undoes these first.
        self._stops_after_end = 0
        # Words ANDed into every filled row (the #800 workaround above), or None.
        self._extra_mask = extra_mask
        # Special tokens and the backend's stop tokens this request does not stop on:
        # xgrammar accepts the latter as silent no-ops and logs on the former.
        self._never = never - set(self._stop_token_ids)
        self.params = params

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The tokens that end the output once the grammar is complete."""
        return self._stop_token_ids

    @property
    def is_terminated(self) -> bool:
        """True once a stop token was accepted after a complete match."""
        return self._matcher.is_terminated()

    @property
    def is_completed(self) -> bool:
        """True if the output so far is a complete match (a stop token is now allowed)."""
        return self._matcher.is_completed()

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar rejects it.

        A rejected token means the mask was not applied to this row (or a token was forced
        past it); the caller decides whether to abort the request.
        """
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size or token_id in self._never:
            return False  # checked here: xgrammar would log to stderr, or not reject at all
        if self._matcher.is_terminated():
            if token_id in self._stop_token_ids:
                self._stops_after_end += 1
                return True
            return False
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (CPU int32, see module doc)."""
        if self._matcher.is_terminated():
            # xgrammar refuses to fill after termination; only the stop tokens stay allowed.
            bitmask[row].zero_()
            for token_id in self._stop_token_ids:
                set_bit(bitmask, row, token_id)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)
        self._restrict(bitmask, row)

    def _restrict(self, bitmask: torch.Tensor, row: int) -> None:
        if self._extra_mask is not None:
            bitmask[row, : self._extra_mask.shape[0]] &= self._extra_mask

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (e.g. rejected draft tokens)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        undo_stops = min(num_tokens, self._stops_after_end)
        self._stops_after_end -= undo_stops
        if num_tokens - undo_stops:
            self._matcher.rollback(num_tokens - undo_stops)

    def reset(self) -> None:
        """Return to the start state (nothing accepted)."""
        self._matcher.reset()
        self._stops_after_end = 0


class GrammarBackend:
    """Compiles guides for one tokenizer/model pair and creates per-request matchers.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the model's logits width (``config.vocab_size``). It may exceed the
            tokenizer's size (padded embeddings); the extra ids are never allowed.
        stop_token_ids: the tokens that end a guided output; default the tokenizer's EOS.
            Pass the model's EOS ids (``ModelConfig.eos_token_ids``) when they differ.
        any_whitespace: JSON guides allow any whitespace between elements (xgrammar's
            default). False forces compact JSON (``, `` and ``: ``), which keeps a model
            from padding its output with whitespace.
        max_threads: compiler threads (compilation releases the GIL).
        cache_limit_bytes: bound of the compiled-grammar cache, -1 for unbounded.

    Caching: xgrammar's ``GrammarCompiler`` caches compiled grammars keyed by the input
    string (schema / regex / EBNF, plus options) with LRU eviction under
    ``cache_limit_bytes``; :class:`GuidedDecodingParams` normalises schemas to one string
    form, so the key is effectively ``(kind, spec)``. A compiled grammar is immutable and
    shared by all matchers created from it.

    Raises:
        ValueError: bad ``vocab_size`` or stop ids, or no stop id could be determined.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        stop_token_ids: Sequence[int] | None = None,
        any_whitespace: bool = True,
        max_threads: int = 8,
        cache_limit_bytes: int = 256 << 20,
    ) -> None:
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("the tokenizer has no eos_token_id; pass stop_token_ids")
            stop_token_ids = [eos]
        stops = self._check_stop_ids(stop_token_ids, vocab_size)
        self._vocab_size = vocab_size
        self._stop_token_ids = stops
        self._any_whitespace = any_whitespace
        self._tokenizer_info = build_tokenizer_info(tokenizer, vocab_size, stops)
        self._compiler = xgr.GrammarCompiler(
            self._tokenizer_info,
            max_threads=max_threads,
            cache_enabled=True,
            cache_limit_bytes=cache_limit_bytes,
        )
        self._never = frozenset(self._tokenizer_info.special_token_ids) | frozenset(stops)
        self._batch_matcher: xgr.BatchGrammarMatcher | None = None  # made on first use
        self._json_control_mask: torch.Tensor | None = None  # made on first use

    @staticmethod
    def _check_stop_ids(ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
        stops = tuple(dict.fromkeys(int(i) for i in ids))
        if not stops or not all(0 <= i < vocab_size for i in stops):
            raise ValueError(
                f"stop_token_ids must be a non-empty list of ids in [0, {vocab_size}), "
                f"got {list(ids)!r}"
            )
        return stops

    @property
    def vocab_size(self) -> int:
        """The logits width the bitmasks cover."""
        return self._vocab_size

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The default stop tokens of new matchers."""
        return self._stop_token_ids

    @property
    def tokenizer_info(self) -> xgr.TokenizerInfo:
        """xgrammar's tokenizer description (special tokens blanked, see module doc)."""
        return self._tokenizer_info

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        """The underlying xgrammar compiler (its cache is the compiled-grammar cache)."""
        return self._compiler

    def compile(self, params: GuidedDecodingParams) -> xgr.CompiledGrammar:
        """Compile (or fetch from the cache) the grammar of ``params``.

        Raises:
            ValueError: the guide does not compile; the message names the field
                (``GuidedDecodingParams.json`` / ``.regex`` / ``.grammar``) and the reason.
        """
        kind, spec = params.kind, params.spec
        try:
            if kind == "json":
                return self._compiler.compile_json_schema(spec, any_whitespace=self._any_whitespace)
            if kind == "json_object":
                # strict_mode=False: strict mode would forbid properties the schema does not
                # list, and {"type": "object"} lists none.
                return self._compiler.compile_json_schema(
                    _JSON_OBJECT_SCHEMA, any_whitespace=self._any_whitespace, strict_mode=False
                )
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            return self._compiler.compile_grammar(spec)
        except (RuntimeError, ValueError) as exc:  # xgrammar raises RuntimeError subclasses
            raise ValueError(
                f"GuidedDecodingParams.{kind} is not a valid {_KIND_WHAT[kind]}: "
                f"{_clean_error(exc)}"
            ) from exc

    def new_matcher(
        self, params: GuidedDecodingParams, *, stop_token_ids: Sequence[int] | None = None
    ) -> RequestGrammar:
        """Create the grammar state of a new request.

        Args:
            params: the request's guide.
            stop_token_ids: this request's stop tokens (e.g. its ``end_id``) instead of the
                backend's default ones.

        Raises:
            ValueError: the guide does not compile, or bad ``stop_token_ids``.
        """
        compiled = self.compile(params)
        override = None
        if stop_token_ids is not None:
            override = list(self._check_stop_ids(stop_token_ids, self._vocab_size))
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=override)
        extra = None
        if params.kind == "json" and _LENGTH_BOUND.search(params.spec):
            extra = self._no_control_tokens_mask()
        return RequestGrammar(matcher, params, self._vocab_size, extra, self._never)

    def _no_control_tokens_mask(self) -> torch.Tensor:
        """Bitmask words allowing every token without a raw JSON-illegal control byte."""
        if self._json_control_mask is None:
            vocab = self._tokenizer_info.decoded_vocab
            bad = [i for i, text in enumerate(vocab) if _JSON_CONTROL.search(bytes(text))]
            mask = allocate_bitmask(1, self._vocab_size)
            for token_id in bad:
                clear_bit(mask, 0, token_id)
            self._json_control_mask = mask[0]
        return self._json_control_mask

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        """A CPU int32 bitmask ``[batch_size, ceil(vocab_size / 32)]``, all tokens allowed
        (see :func:`rtllm.structured.bitmask.allocate_bitmask`)."""
        return allocate_bitmask(batch_size, self._vocab_size)

    def fill_bitmasks(
        self, grammars: Sequence[RequestGrammar], bitmask: torch.Tensor, rows: Sequence[int]
    ) -> None:
        """``grammars[i].fill_bitmask(bitmask, rows[i])`` for all i, in parallel threads."""
        if len(grammars) != len(rows):
            raise ValueError(f"{len(grammars)} grammars but {len(rows)} rows")
        live_matchers: list[xgr.GrammarMatcher] = []
        live_rows: list[int] = []
        for grammar, row in zip(grammars, rows, strict=True):
            if grammar.is_terminated:
                grammar.fill_bitmask(bitmask, row)  # stop tokens only; xgrammar would raise
            else:
                live_matchers.append(grammar._matcher)
                live_rows.append(int(row))
        if live_matchers:
            if self._batch_matcher is None:
                self._batch_matcher = xgr.BatchGrammarMatcher(max_threads="auto")
            self._batch_matcher.batch_fill_next_token_bitmask(live_matchers, bitmask, live_rows)
            for grammar, row in zip(grammars, rows, strict=True):
                if not grammar.is_terminated:
                    grammar._restrict(bitmask, row)
