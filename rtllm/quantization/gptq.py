"""GPTQ: groupwise integer rounding of one linear layer with error feedback.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") quantizes the weight ``W`` ``[out, in]`` one input column
at a time and spreads each column's rounding error over the columns not yet
quantized, so as to minimise the layer's output error on calibration inputs ``X``
``[n, in]``: ``||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) / 2`` with the Hessian
``H = 2 X^T X`` (:func:`hessian`). Written here from the paper's description:

* dampening: ``H += damp * mean(diag(H)) * I`` (``damp`` 1 %; retried 10x larger if
  the Cholesky factorisation fails); input channels never seen (``H[i, i] == 0``) get
  ``H[i, i] = 1`` and weight 0 (nothing can be learned about them);
* ``U = cholesky(H^-1)`` (upper): row ``j`` of ``U`` divided by ``U[j, j]`` is how an
  error on column ``j`` is best compensated by the columns after it;
* columns in their natural order (``desc_act=False``), in blocks of ``BLOCK`` columns:
  inside a block each column's error ``e = (w - q) / U[j, j]`` updates the rest of
  the block at once (``W[:, j+1:] -= e U[j, j+1:]``), the columns after the block get
  the block's errors in one matrix product at its end (lazy batch updates);
* each group's grid (scale, zero) is computed from the group's *updated* weights when
  its first column is reached, with the arithmetic of :mod:`rtllm.quantization.rtn`:
  asymmetric ``[min(w_min, 0), max(w_max, 0)]`` onto ``[0, 2**bits - 1]``, symmetric
  ``amax / (2**(bits-1) - 1)``; ``group_size=-1`` is one group per row.

Output invariant (what lets the result travel through every float-weight path of
rtllm: quantization on load, ``rtllm quantize`` and the dequantizing forward of a
float model during sequential calibration): the returned float weight
``(q - zero) * scale`` re-quantized by round-to-nearest
(:func:`~rtllm.quantization.rtn.quantize_groupwise_asymmetric` /
:func:`~rtllm.quantization.rtn.quantize_groupwise_symmetric`) gives back exactly the
same codes and zeros, and scales equal up to float32 rounding. It holds because each
group keeps its grid's end points: in every (row, group) the element that set the
range when the grid was computed is quantized to the grid's end code (``0`` /
``2**bits - 1``, or ``+-(2**(bits-1) - 1)`` symmetric) whatever the error feedback
did to it since (it received no more than a few steps of feedback; its rounding error
is fed back like any other), and symmetric codes stay in ``[-qmax, qmax]`` (RTN never
produces ``-qmax - 1``). A group whose range is 0 at grid time is quantized to 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rtllm.quantization.packing import GroupwiseWeights

logger = logging.getLogger(__name__)

#: Columns per lazy-update block.
BLOCK = 128
#: Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal.
DAMP = 0.01


@dataclass(slots=True)
class GptqResult:
    """GPTQ's rounding of one weight.

    ``weights`` is rtllm's internal groupwise layout (uint8 codes ``[out, in]``, int32
    zeros and float32 scales ``[out, G]``; symmetric grids store the zero
    ``2**(bits-1)``); ``dequantized`` is ``(q - zero) * scale`` float32 ``[out, in]``.
    """

    weights: GroupwiseWeights
    dequantized: torch.Tensor


def hessian(gram: torch.Tensor, count: int) -> torch.Tensor:
    """GPTQ's ``H = 2 X^T X / n`` (float32) from the Gram matrix ``X^T X`` of ``count``
    input rows (the ``1 / n`` only normalises: dampening is relative)."""
    if count <= 0:
        raise ValueError("the Hessian needs at least one input row")
    return (gram.double() * (2.0 / count)).float()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32)."""
    h64 = h.double()
    eye = torch.eye(h64.shape[0], dtype=h64.dtype, device=h64.device)
    mean_diag = float(torch.diagonal(h64).mean())
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h64 + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    logger.debug("GPTQ: Hessian dampened %gx more to factorise", 10**attempt)
                return upper.float()
    raise ValueError("GPTQ: the dampened Hessian is not positive definite")


@dataclass(slots=True)
class _Grid:
    """One group's grid, per row (output channel) of the weight."""

    scale: torch.Tensor  # [out] float32, > 0
    zero: torch.Tensor  # [out] float32 integer values (unsigned code of 0.0)
    low: float  # smallest unsigned code rounding may give
    high: float  # largest unsigned code rounding may give
    forced: torch.Tensor  # [g, out] bool: element keeps a fixed code (grid end / empty)
    forced_code: torch.Tensor  # [g, out] float32 unsigned code where ``forced``


def _grid(wt: torch.Tensor, bits: int, zero_point: bool) -> _Grid:
    """The grid of one group from its current weights ``wt`` ``[g, out]`` (transposed),
    with rtn's arithmetic, and the elements that keep its ends (module doc)."""
    cols = torch.arange(wt.shape[0], device=wt.device)[:, None]
    if zero_point:
        qmax = float((1 << bits) - 1)
        lo = wt.amin(dim=0).clamp(max=0.0)
        hi = wt.amax(dim=0).clamp(min=0.0)
        span = hi - lo
        scale = torch.where(span > 0, span / qmax, torch.ones_like(span))
        zero = torch.round(-lo / scale).clamp_(0, qmax)
        empty = span == 0
        # zero > 0 needs lo < 0, so the argmin set lo; zero < qmax needs hi > 0.
        keep_low = (cols == wt.argmin(dim=0)) & (zero > 0)
        keep_high = (cols == wt.argmax(dim=0)) & (zero < qmax)
        forced_code = torch.where(keep_high, qmax, 0.0)
        low, high = 0.0, qmax
    else:
        qmax = float((1 << (bits - 1)) - 1)
        offset = float(1 << (bits - 1))
        amax, arg = wt.abs().max(dim=0)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        zero = torch.full_like(scale, offset)
        empty = amax == 0
        keep_low = torch.zeros_like(empty)[None, :]
        keep_high = cols == arg
        sign = torch.sign(wt.gather(0, arg[None, :])).squeeze(0)
        forced_code = (offset + sign * qmax).expand(wt.shape[0], -1)
        low, high = offset - qmax, offset + qmax
    forced = keep_low | keep_high | empty
    forced_code = torch.where(empty, zero, forced_code).expand(wt.shape).contiguous()
    return _Grid(scale, zero, low, high, forced.expand(wt.shape).contiguous(), forced_code)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    damp: float | None = None,
    block: int = BLOCK,
) -> GptqResult:
    """GPTQ rounding of ``weight`` ``[out, in]`` for inputs with Hessian ``h``
    ``[in, in]`` (module doc); ``group_size=-1``: one group per row; ``damp``:
    :data:`DAMP` when None.

    Raises:
        ValueError: bad shapes, a group size that does not divide ``in``, or a
            Hessian that no dampening makes positive definite.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if weight.dim() != 2 or h.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(h.shape)} disagree")
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    if group <= 0 or in_features % group:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    # Transposed [in, out]: a weight column (one input channel) is a contiguous row.
    wt = weight.float().t().contiguous()
    h = h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    u = _inverse_cholesky(h, DAMP if damp is None else damp)
    codes = torch.empty_like(wt)
    num_groups = in_features // group
    scales = torch.empty(num_groups, out_features, device=wt.device)
    zeros = torch.empty_like(scales)
    grid: _Grid | None = None
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block = wt[start:stop].clone()  # receives this block's in-block updates
        errors = torch.empty_like(w_block)
        u_block = u[start:stop, start:stop]
        for j in range(stop - start):
            col = start + j
            if col % group == 0:
                # The group's current weights: updated in-block columns, then (groups
                # wider than a block) columns after the block, updated up to it.
                end = col + group
                current = w_block[j : j + group]
                if end > stop:
                    current = torch.cat([current, wt[stop:end]])
                grid = _grid(current, bits, zero_point)
                scales[col // group] = grid.scale
                zeros[col // group] = grid.zero
            assert grid is not None  # column 0 starts a group
            w = w_block[j]
            q = (torch.round(w / grid.scale) + grid.zero).clamp_(grid.low, grid.high)
            q = torch.where(grid.forced[col % group], grid.forced_code[col % group], q)
            codes[col] = q
            err = (w - (q - grid.zero) * grid.scale) / u_block[j, j]
            # Invariant: columns > j of the block hold all feedback from columns <= j.
            w_block[j + 1 :].addr_(u_block[j, j + 1 :], err, alpha=-1.0)
            errors[j] = err
        # Invariant: columns >= stop hold all feedback from columns < stop.
        wt[stop:].addmm_(u[start:stop, stop:].t(), errors, alpha=-1.0)
    q = codes.t().to(torch.uint8)
    scales, zeros = scales.t().contiguous(), zeros.t().contiguous()
    expanded = torch.repeat_interleave
    dequantized = (codes.t() - expanded(zeros, group, dim=1)) * expanded(scales, group, dim=1)
    return GptqResult(GroupwiseWeights(q, zeros.to(torch.int32), scales), dequantized)


def output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(delta H delta^T)``: the summed squared output error (up to the Hessian's
    normalisation) of a weight error ``delta`` ``[out, in]``."""
    d = delta.float()
    return float(((d @ h.float()) * d).sum())
