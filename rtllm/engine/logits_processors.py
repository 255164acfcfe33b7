"""Batched logits processing: biases, bans and penalties for a whole step at once.

:func:`process_logits` takes one step's ``[B, V]`` logits and each row's
:class:`LogitsParams` plus token history (host lists, which the engine already holds),
and applies every op to all the rows that use it with scatter/gather/masked_fill. Rows
with different parameters share the call; an op that no row uses is skipped, and rows
that do not use an op are left out of its work. Each op builds its few index tensors
once per call, with one host-to-device copy each (:func:`rtllm.runtime.transfer.to_device`),
and nothing reads device data back, so the step can be launched without waiting for
the device.

Order (rows that set nothing come out unchanged):

1. ``embedding_bias`` is added.
2. Bad words (``bad_token_ids``, ``bad_sequences``) get ``-inf``.
3. End ids get ``-inf`` while fewer than ``min_tokens`` tokens were generated.
4. ``no_repeat_ngram_size``: tokens that would repeat an n-gram get ``-inf``.
5. ``repetition_penalty`` (prompt + generated tokens).
6. ``frequency_penalty`` and ``presence_penalty`` (generated tokens only).

Steps 2 to 4 only set ``-inf``, which every later step keeps (``-inf`` times or minus
a finite number), so they commute with each other and with 5 and 6; the order between
1, 5 and 6 is the one that changes results. A row whose every token is banned comes
out all ``-inf``; choosing what to do then (e.g. end the request) is the caller's job.

:func:`apply_min_p` is the min-p filter, applied to probabilities after temperature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rtllm.runtime.transfer import to_device

_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class LogitsParams:
    """One request's logits-processing knobs, as plain Python values.

    Build it once per request (not per step). The defaults change nothing.

    Attributes:
        repetition_penalty: Positive logits of tokens seen in prompt + output are divided
            by it, negative ones multiplied (transformers' ``RepetitionPenaltyLogitsProcessor``);
            > 0, 1.0 disables it.
        presence_penalty: Subtracted once from each token that occurs in the output
            (OpenAI's definition; the prompt is not counted).
        frequency_penalty: Subtracted from each token once per occurrence in the output.
        no_repeat_ngram_size: Ban every token that would complete an n-gram of this size
            already present in prompt + output (transformers' ``NoRepeatNGramLogitsProcessor``);
            0 disables it.
        min_tokens: ``end_ids`` are banned while the output has fewer tokens than this.
        end_ids: The end-of-sequence ids that ``min_tokens`` bans.
        bad_token_ids: Tokens banned at every step.
        bad_sequences: Multi-token bad words: the last token of a sequence is banned when
            the output (not the prompt) ends with the tokens before it. A sequence of one
            token is banned at every step.
        embedding_bias: ``[V]`` float tensor added to the logits; keep it on the logits'
            device, or every step pays a blocking copy.
    """

    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_tokens: int = 0
    end_ids: frozenset[int] = frozenset()
    bad_token_ids: frozenset[int] = frozenset()
    bad_sequences: tuple[tuple[int, ...], ...] = ()
    embedding_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")
        for name in ("no_repeat_ngram_size", "min_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if any(len(seq) == 0 or min(seq) < 0 for seq in self.bad_sequences):
            raise ValueError(
                f"bad_sequences must be non-empty sequences of token ids >= 0, "
                f"got {self.bad_sequences!r}"
            )
        if self.embedding_bias is not None and self.embedding_bias.dim() != 1:
            raise ValueError(
                f"embedding_bias must be a 1-D tensor, got shape {tuple(self.embedding_bias.shape)}"
            )

    @property
    def is_noop(self) -> bool:
        """True when :func:`process_logits` leaves this request's logits unchanged."""
        return (
            self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.no_repeat_ngram_size == 0
            and (self.min_tokens == 0 or not self.end_ids)
            and not self.bad_token_ids
            and not self.bad_sequences
            and self.embedding_bias is None
        )


@dataclass(frozen=True, slots=True)
class PendingTokens:
    """Rows whose last output token is still on the device (the overlap loop):
    ``output_ids[rows[i]]`` ends with a placeholder whose value is ``tokens[i]``."""

    rows: list[int]
    tokens: torch.Tensor  # [len(rows)] long, on the logits' device


def process_logits(
    logits: torch.Tensor,
    params: Sequence[LogitsParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    pending: PendingTokens | None = None,
) -> torch.Tensor:
    """Apply each row's :class:`LogitsParams` to ``logits`` ``[B, V]`` float32, in place.

    ``params``, ``prompt_ids`` and ``output_ids`` (the tokens generated so far) have one
    entry per row. Returns ``logits`` itself, modified in place (the caller clones it
    first if it needs the raw values). See the module docstring for the order of ops.
    Token ids >= V in the histories are ignored (they cannot be generated anyway).

    With ``pending``, those rows' last output token is a placeholder that the penalty
    ops (repetition, presence, frequency, n-gram) replace on the device by the real
    token, so the step need not wait for it. Bad-word sequences and ``min_tokens`` are
    decided on the host: a bad sequence must not depend on a pending token (the caller
    commits first for those), and ``min_tokens`` only needs the count.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(
            f"logits must be a [B, V] float32 tensor, got {tuple(logits.shape)} {logits.dtype}"
        )
    batch = logits.shape[0]
    if not len(params) == len(prompt_ids) == len(output_ids) == batch:
        raise ValueError(
            f"need one params, prompt and output per logits row ({batch}), got "
            f"{len(params)}, {len(prompt_ids)} and {len(output_ids)}"
        )
    if all(p.is_noop for p in params):
        return logits
    pending_rows = {} if pending is None else {row: i for i, row in enumerate(pending.rows)}
    _add_embedding_bias(logits, params)
    _ban_tokens(logits, params, output_ids)
    _apply_history_penalties(logits, params, prompt_ids, output_ids, pending, pending_rows)
    _apply_presence_frequency(logits, params, output_ids, pending, pending_rows)
    return logits


def _patch_last_column(
    values: torch.Tensor, rows: list[int], pending: PendingTokens | None, pending_rows: dict[int, int]
) -> torch.Tensor:
    """Put the device-side pending tokens in the last column of a left-padded history
    (``rows[r]`` is the batch row of history row ``r``)."""
    if pending is None:
        return values
    patch = [(r, pending_rows[row]) for r, row in enumerate(rows) if row in pending_rows]
    if not patch:
        return values
    device = values.device
    index = to_device([[r for r, _ in patch], [i for _, i in patch]], torch.long, device)
    last = torch.full_like(index[0], values.shape[1] - 1)
    values.index_put_((index[0], last), pending.tokens.index_select(0, index[1]).to(values.dtype))
    return values


def _select_rows(logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The op's rows of ``logits`` and their index (None when the op covers every row).

    ``rows`` is increasing, so covering every row means it is ``0..B-1`` in order.
    """
    if len(rows) == logits.shape[0]:
        return logits, None
    index = to_device(rows, torch.long, logits.device)
    return logits.index_select(0, index), index


def _write_rows(logits: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
    if index is not None:
        logits.index_copy_(0, index, values)
    elif values is not logits:
        logits.copy_(values)


def _pad_left(rows: list[list[int]], width: int, pad: int) -> list[list[int]]:
    return [[pad] * (width - len(row)) + row for row in rows]


def _add_embedding_bias(logits: torch.Tensor, params: Sequence[LogitsParams]) -> None:
    pairs = [(i, p.embedding_bias) for i, p in enumerate(params) if p.embedding_bias is not None]
    if not pairs:
        return
    vocab = logits.shape[1]
    for i, bias in pairs:
        if bias.shape[0] != vocab:
            raise ValueError(f"embedding_bias of row {i} has {bias.shape[0]} entries, need {vocab}")
    stacked = torch.stack([bias.to(device=logits.device, dtype=torch.float32) for _, bias in pairs])
    if len(pairs) == logits.shape[0]:
        logits.add_(stacked)
    else:
        rows = [i for i, _ in pairs]
        logits.index_add_(0, to_device(rows, torch.long, logits.device), stacked)


def _ban_tokens(
    logits: torch.Tensor, params: Sequence[LogitsParams], output_ids: Sequence[Sequence[int]]
) -> None:
    """Bad words and the ``min_tokens`` end-id mask, decided on the host from the histories."""
    vocab = logits.shape[1]
    rows: list[int] = []
    tokens: list[int] = []
    for i, (p, output) in enumerate(zip(params, output_ids, strict=True)):
        if not (p.bad_token_ids or p.bad_sequences or len(output) < p.min_tokens):
            continue
        banned = set(p.bad_token_ids)
        for seq in p.bad_sequences:
            # The output must end with the sequence minus its last token (always true for 1).
            prefix_len = len(seq) - 1
            if prefix_len == 0 or (
                len(output) >= prefix_len and tuple(output[-prefix_len:]) == seq[:-1]
            ):
                banned.add(seq[-1])
        if len(output) < p.min_tokens:
            banned |= p.end_ids
        banned_in_vocab = [t for t in banned if t < vocab]
        rows += [i] * len(banned_in_vocab)
        tokens += banned_in_vocab
    if rows:
        index = to_device([rows, tokens], torch.long, logits.device)
        # A device scalar: `logits[i, j] = float` would copy a host scalar and wait.
        logits.index_put_((index[0], index[1]), logits.new_full((), _NEG_INF))


def _apply_history_penalties(
    logits: torch.Tensor,
    params: Sequence[LogitsParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    pending: PendingTokens | None = None,
    pending_rows: dict[int, int] | None = None,
) -> None:
    """``no_repeat_ngram_size`` and ``repetition_penalty``: both read prompt + output.

    One left-padded ``[R, W]`` history tensor serves both ops (padding is -1, never a
    token id), over the rows that use either; a row that uses only one of them gets the
    other's neutral value (n-gram size 0, penalty 1.0).
    """
    rows: list[int] = []
    ngram_sizes: list[int] = []
    histories: list[list[int]] = []
    for i, p in enumerate(params):
        length = len(prompt_ids[i]) + len(output_ids[i])
        # With fewer tokens than n, no n-gram is complete yet, so nothing is banned.
        ngram_size = p.no_repeat_ngram_size if length >= p.no_repeat_ngram_size else 0
        if ngram_size == 0 and p.repetition_penalty == 1.0:
            continue
        rows.append(i)
        ngram_sizes.append(ngram_size)
        histories.append([*prompt_ids[i], *output_ids[i]])
    if not rows:
        return
    max_ngram = max(ngram_sizes)
    # max_ngram - 1 extra columns of padding keep every window's slices in range.
    width = max(map(len, histories)) + max(max_ngram - 1, 0)
    device = logits.device
    history = to_device(_pad_left(histories, width, -1), torch.long, device)
    history = _patch_last_column(history, rows, pending, pending_rows or {})
    values, index = _select_rows(logits, rows)
    if max_ngram > 0:
        sizes = to_device(ngram_sizes, torch.long, device)
        values = _ban_repeated_ngrams(values, history, sizes, max_ngram)
    penalties = [params[i].repetition_penalty for i in rows]
    if any(p != 1.0 for p in penalties):
        factors = to_device(penalties, torch.float32, device)
        values = _repetition_penalty(values, history, factors)
    _write_rows(logits, index, values)


def _ban_repeated_ngrams(
    logits: torch.Tensor, history: torch.Tensor, sizes: torch.Tensor, max_size: int
) -> torch.Tensor:
    """Ban every token that would complete an n-gram already in ``history``.

    ``history`` is ``[R, W]``, left-padded with -1 and with at least ``max_size - 1``
    columns of padding; ``sizes`` ``[R]`` holds each row's n (0: the row is untouched).
    For the window whose last token sits at column ``j``, its token ``j - k`` must equal
    the history's k-th token from the end, for ``k = 1 .. n-1``: then the history ends
    with that window's first n-1 tokens, and its last token would repeat it. Comparisons
    for ``k >= n`` are ignored per row. Padding never equals a token, so a window that
    reaches into the padding never matches.
    """
    num_rows, vocab = logits.shape
    width = history.shape[1]
    last = history[:, max_size - 1 :]
    match = (last >= 0) & (sizes > 0).unsqueeze(1)
    for k in range(1, max_size):
        same = history[:, max_size - 1 - k : width - k] == history[:, width - k : width - k + 1]
        match &= same | (sizes <= k).unsqueeze(1)
    # Non-matching windows (and ids >= vocab) go to a spare column, cut off below.
    columns = torch.where(match, last.clamp(max=vocab), vocab)
    banned = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, columns, True)
    return logits.masked_fill(banned[:, :vocab], _NEG_INF)


def _repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalties: torch.Tensor
) -> torch.Tensor:
    """Divide positive (multiply negative) logits of tokens in ``history`` by ``penalties``."""
    vocab = logits.shape[1]
    ids = history.masked_fill(history < 0, vocab).clamp(max=vocab)
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    factor = penalties.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / factor, logits * factor)
    return torch.where(seen[:, :vocab], penalized, logits)


def _apply_presence_frequency(
    logits: torch.Tensor,
    params: Sequence[LogitsParams],
    output_ids: Sequence[Sequence[int]],
    pending: PendingTokens | None = None,
    pending_rows: dict[int, int] | None = None,
) -> None:
    """OpenAI's ``logit - frequency * count - presence * (count > 0)`` over the output."""
    # A row with no output yet has nothing to penalise.
    rows = [
        i
        for i, p in enumerate(params)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and len(output_ids[i]) > 0
    ]
    if not rows:
        return
    vocab = logits.shape[1]
    device = logits.device
    outputs = [list(output_ids[i]) for i in rows]
    # Padding is vocab, the spare column; ids >= vocab are clamped into it too.
    ids = to_device(_pad_left(outputs, max(map(len, outputs)), vocab), torch.long, device)
    ids = _patch_last_column(ids, rows, pending, pending_rows or {}).clamp(max=vocab)
    coefficients = [[params[i].frequency_penalty, params[i].presence_penalty] for i in rows]
    coef = to_device(coefficients, torch.float32, device)
    values, index = _select_rows(logits, rows)
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    counts = counts[:, :vocab]
    values = values - coef[:, 0:1] * counts - coef[:, 1:2] * (counts > 0)
    _write_rows(logits, index, values)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens whose probability is below ``min_p`` times their row's largest.

    ``probs`` is ``[B, V]``, ``min_p`` ``[B]`` in [0, 1]; a row with ``min_p == 0`` comes
    out unchanged. Returns a new tensor, *not* renormalised (the sampler's exponential
    race does not need it; divide by the row sums for a distribution).
    """
    if probs.dim() != 2 or min_p.shape != (probs.shape[0],):
        raise ValueError(
            f"need probs [B, V] and min_p [B], got {tuple(probs.shape)} and {tuple(min_p.shape)}"
        )
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.to(probs.dtype).unsqueeze(1)
    return probs.masked_fill(probs < threshold, 0.0)
