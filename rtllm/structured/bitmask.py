"""Token bitmasks: xgrammar's layout, and applying a batch of them to logits.

Layout: an int32 tensor ``[batch, ceil(vocab_size / 32)]`` on CPU; token ``t`` is allowed
in row ``r`` iff bit ``t % 32`` of ``bitmask[r, t // 32]`` is 1 (xgrammar's layout, so its
matchers fill rows directly).

:func:`apply_bitmask` uses xgrammar's C++ kernel on CPU and plain torch elsewhere, never
xgrammar's Triton kernel: see the package docstring (``rtllm/structured/__init__.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import xgrammar as xgr

BITS_PER_WORD = 32
_XGRAMMAR_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bit_value(bit: int) -> int:
    # int32 words: bit 31 is the sign bit, so its value is -2**31, not 2**31.
    return -(1 << 31) if bit == 31 else 1 << bit


def set_bit(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    """Allow ``token_id`` in ``bitmask[row]``."""
    word, bit = divmod(token_id, BITS_PER_WORD)
    bitmask[row, word] |= _bit_value(bit)


def clear_bit(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    """Disallow ``token_id`` in ``bitmask[row]``."""
    word, bit = divmod(token_id, BITS_PER_WORD)
    bitmask[row, word] &= ~_bit_value(bit)


def allowed_token_ids(bitmask: torch.Tensor, row: int, vocab_size: int) -> list[int]:
    """The token ids that ``bitmask[row]`` allows, ascending (for debugging and tests)."""
    words = bitmask[row : row + 1, : -(-vocab_size // BITS_PER_WORD)]
    return (~_disallowed(words, vocab_size))[0].nonzero().flatten().tolist()


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 bitmask ``[batch_size, ceil(vocab_size / 32)]`` with every token allowed.

    Plain (pageable) memory on purpose: :func:`apply_bitmask` copies from it synchronously
    with respect to the host, so the caller may refill it for the next step as soon as
    ``apply_bitmask`` returns, even while the GPU still runs.
    """
    if batch_size <= 0 or vocab_size <= 0:
        raise ValueError(
            f"batch_size and vocab_size must be positive, got {batch_size}, {vocab_size}"
        )
    width = -(-vocab_size // BITS_PER_WORD)
    return torch.full((batch_size, width), -1, dtype=torch.int32)


def _disallowed(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack int32 mask words ``[R, W]`` into a bool ``[R, vocab_size]``: True = masked."""
    # Viewing the words as bytes (little-endian: byte k of word w holds tokens
    # 32w + 8k .. 32w + 8k + 7) keeps the intermediate at one byte per token.
    assert sys.byteorder == "little"
    as_bytes = words.contiguous().view(torch.uint8)  # [R, 4W]
    # arange is made on the device itself: no second host->device copy.
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1  # [R, 4W, 8]
    return (bits == 0).view(words.shape[0], -1)[:, :vocab_size]


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy ``host`` to ``device`` so that ``host`` may be overwritten as soon as this returns.

    From pageable memory, CUDA stages the source before the asynchronous copy returns, so
    ``non_blocking=True`` does not let a later refill of the caller's bitmask race the
    copy. A pinned source would be read by the DMA later, hence the pageable clone.
    """
    if device.type == "cpu":
        return host
    if host.is_pinned():
        host = host.clone()  # clone() of a pinned tensor is pageable
    return host.to(device, non_blocking=True)


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None
) -> None:
    """Set ``logits[r, t] = -inf`` for each row ``r`` in ``rows`` and each token ``t`` that
    ``bitmask[r]`` disallows; other rows are not touched (not even rewritten).

    Args:
        logits: ``[B, V]`` floating tensor on any device, modified in place.
        bitmask: CPU int32 ``[>= B, >= ceil(V / 32)]``; row ``r`` applies to logits row ``r``.
        rows: the constrained rows; None means all ``B`` rows.

    On CPU this is xgrammar's C++ kernel (never its Triton one); on other devices plain
    torch ops after one host->device copy (the mask rows, with the row indices packed in
    an extra column when only some rows are constrained).
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor, got {tuple(logits.shape)} {logits.dtype}"
        )
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.device.type != "cpu":
        raise ValueError("bitmask must be a 2-D int32 CPU tensor (GrammarBackend.allocate_bitmask)")
    batch, vocab = logits.shape
    if bitmask.shape[1] * BITS_PER_WORD < vocab:
        raise ValueError(
            f"bitmask covers {bitmask.shape[1] * BITS_PER_WORD} tokens but logits have {vocab}; "
            "allocate it with the model's vocab_size"
        )
    row_list = list(range(batch)) if rows is None else [int(r) for r in rows]
    if not row_list:
        return
    if min(row_list) < 0 or max(row_list) >= min(batch, bitmask.shape[0]):
        raise ValueError(f"rows must be in [0, {min(batch, bitmask.shape[0])}), got {row_list}")
    if len(set(row_list)) != len(row_list):
        raise ValueError(f"rows must be distinct, got {row_list}")
    # Only the words covering the logits, so the kernels see exactly V tokens.
    bitmask = bitmask[:, : -(-vocab // BITS_PER_WORD)].contiguous()
    if (
        logits.device.type == "cpu"
        and logits.dtype in _XGRAMMAR_CPU_DTYPES
        # xgrammar 0.2.8's CPU kernel masks the wrong elements for a column stride != 1.
        and logits.stride(1) == 1
    ):
        all_rows = row_list == list(range(batch))
        xgr.apply_token_bitmask_inplace(
            logits,
            bitmask[:batch] if all_rows else bitmask,
            vocab_size=vocab,
            indices=None if all_rows else row_list,
            backend="cpu",  # explicit: "auto" is fine on CPU, but never risk Triton
        )
        return
    _apply_with_torch(logits, bitmask, row_list)


def _apply_with_torch(logits: torch.Tensor, bitmask: torch.Tensor, row_list: list[int]) -> None:
    """:func:`apply_bitmask` in plain torch ops, for any device (arguments validated)."""
    batch, vocab = logits.shape
    width = bitmask.shape[1]
    neg_inf = float("-inf")
    if row_list == list(range(batch)):
        words = _to_device(bitmask[:batch], logits.device)
        logits.masked_fill_(_disallowed(words, vocab), neg_inf)
        return
    # Row indices ride in an extra column so mask and indices cross in a single copy.
    index = torch.tensor(row_list, dtype=torch.int64)
    packed = torch.empty((len(row_list), width + 1), dtype=torch.int32)
    packed[:, :width] = bitmask.index_select(0, index)
    packed[:, width] = index.to(torch.int32)
    packed = _to_device(packed, logits.device)
    device_rows = packed[:, width].long()
    selected = logits.index_select(0, device_rows)
    selected.masked_fill_(_disallowed(packed[:, :width], vocab), neg_inf)
    logits.index_copy_(0, device_rows, selected)
