"""Streaming stop-string detection on detokenized text.

:class:`StopStringMatcher` sits after the :class:`~rtllm.llmapi.detokenizer.
IncrementalDetokenizer`: every text delta goes through :meth:`StopStringMatcher.process`,
which returns the part that is safe to show the user and whether generation must stop.

Semantics (identical to a non-incremental search over the whole text, however the text
is split into deltas):

* The match is the stop-string occurrence with the **earliest start** in the output
  text; among stop strings starting at the same position the **shortest** wins (it is
  complete first, and a stop string that is a prefix of another one always wins).
* The final output is the text before the match, or up to and including the match with
  ``include_stop_str_in_output``.
* Text that may still turn out to be part of a stop string is held back, so the
  concatenation of everything emitted (``process`` outputs plus ``flush``) is always
  exactly the final output; nothing is ever retracted.

Because an earlier-starting, longer stop string wins over a shorter one found inside
it, a complete occurrence is only reported once no still-open partial occurrence starts
before it (e.g. stops ``["Observation:", "ion"]`` on ``"Observation:"`` stop at
``"Observation:"``). If the output ends while such a decision is pending, :meth:`flush`
resolves it (and sets :attr:`matched`).
"""

from __future__ import annotations

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Incremental matcher for a request's stop strings.

    Args:
        stop: Stop strings; empty strings and duplicates are ignored. With no stop
            strings :meth:`process` is a pass-through.
        include_stop_str_in_output: Keep the matched stop string at the end of the
            output instead of cutting right before it.
    """

    __slots__ = (
        "_buf",
        "_first_chars",
        "_include",
        "_matched",
        "_max_len",
        "_prefixes",
        "_stops",
    )

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        # Deduplicate, keep the caller's order (irrelevant for the result, but stable).
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self._include = include_stop_str_in_output
        self._matched: str | None = None
        # Text received but not emitted yet. Invariant: every character before _buf has
        # been emitted and provably starts no stop-string occurrence.
        self._buf = ""
        self._max_len = max((len(s) for s in self._stops), default=0)
        # Every non-empty proper prefix of a stop string: "buf[j:] in _prefixes" means an
        # occurrence starting at j could still be completed by future text.
        self._prefixes: frozenset[str] = frozenset(
            s[:k] for s in self._stops for k in range(1, len(s))
        )
        self._first_chars: frozenset[str] = frozenset(s[0] for s in self._stops)

    # ------------------------------------------------------------------ public API

    @property
    def stop(self) -> tuple[str, ...]:
        """The effective (non-empty, deduplicated) stop strings."""
        return self._stops

    @property
    def matched(self) -> str | None:
        """The stop string that ended the output, or ``None``."""
        return self._matched

    @property
    def stopped(self) -> bool:
        """Whether a stop string has matched."""
        return self._matched is not None

    @property
    def pending(self) -> str:
        """Text currently held back (received but not emitted)."""
        return self._buf

    def process(self, new_text: str) -> tuple[str, bool]:
        """Feed a text delta; return ``(text safe to emit now, stopped)``.

        Once ``stopped`` has been returned, further calls return ``("", True)``.
        """
        if not self._stops:
            return new_text, False
        if self._matched is not None:
            return "", True
        if not new_text:
            return "", False
        buf = self._buf + new_text
        found = self._find_match(buf)
        if found is not None:
            start, stop_str = found
            # An earlier-starting occurrence of a longer stop string may still complete;
            # until it is decided, only the text before it is safe.
            open_start = self._open_partial_start(buf, limit=start)
            if open_start is None:
                return self._finish(buf, start, stop_str), True
            self._buf = buf[open_start:]
            return buf[:open_start], False
        open_start = self._open_partial_start(buf, limit=len(buf))
        if open_start is None:
            self._buf = ""
            return buf, False
        self._buf = buf[open_start:]
        return buf[:open_start], False

    def flush(self) -> str:
        """Release the held-back text at the end of the output.

        The output is over, so no partial occurrence can complete any more: a complete
        occurrence still waiting on one now matches (see :attr:`matched`), otherwise all
        pending text is returned.
        """
        buf = self._buf
        if not buf or self._matched is not None:
            return ""
        found = self._find_match(buf)
        if found is not None:
            return self._finish(buf, *found)
        self._buf = ""
        return buf

    # --------------------------------------------------------------- internals

    def _finish(self, buf: str, start: int, stop_str: str) -> str:
        self._matched = stop_str
        self._buf = ""
        return buf[: start + len(stop_str)] if self._include else buf[:start]

    def _find_match(self, buf: str) -> tuple[int, str] | None:
        """Earliest complete occurrence in ``buf`` (ties: shortest stop string)."""
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i, len(s)) < best[:2]):
                best = (i, len(s), s)
        return None if best is None else (best[0], best[2])

    def _open_partial_start(self, buf: str, limit: int) -> int | None:
        """Smallest ``j < limit`` where ``buf[j:]`` is a proper prefix of a stop string.

        Only the last ``max_len - 1`` positions can qualify, so this is O(max_len^2)
        regardless of how long ``buf`` is.
        """
        n = len(buf)
        first_chars = self._first_chars
        prefixes = self._prefixes
        for j in range(max(n - self._max_len + 1, 0), min(limit, n)):
            if buf[j] in first_chars and buf[j:] in prefixes:
                return j
        return None
