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
* columns in blocks of ``BLOCK`` columns: inside a block each column's error
  ``e = (w - q) / U[j, j]`` updates the rest of the block at once
  (``W[:, j+1:] -= e U[j, j+1:]``), the columns after the block get the block's
  errors in one matrix product at its end (lazy batch updates);
* column order and grids (scale, zero per (row, group); groups are always
  ``group_size`` contiguous input channels, ``group_size=-1`` one group per row):

  - natural order (default): each group's grid is computed from the group's
    *updated* weights when its first column is reached;
  - act order (``act_order`` / :data:`ACT_ORDER`; GPTQ's ``desc_act`` with static
    groups): columns in order of decreasing ``diag(H)`` (the most important first,
    while the most columns are left to absorb their errors), ``W`` and ``H`` permuted
    alike; every group's grid is computed once, up front, from the *input* weights
    of its contiguous channels, and each column uses its own group's grid, so the
    output layout stays plain contiguous groups (no ``g_idx``);

* a grid is rtn's (:mod:`rtllm.quantization.rtn`): asymmetric ``[lo, hi] = [min(w_min,
  0), max(w_max, 0)]`` onto ``[0, 2**bits - 1]``, symmetric ``amax / (2**(bits-1) -
  1)``. With a grid search (``grid_shrinks`` / :data:`GRID_SHRINKS`) each (row, group)
  instead keeps, of the ranges ``[a * lo, a * hi]`` (symmetric ``a * amax``) for ``a``
  in ``1.0`` and the given factors, the one with the smallest importance-weighted
  round-to-nearest error ``sum_i H[i, i] (w_i - dequant(quant(w_i)))**2`` over the
  group's weights (those the grid is computed from); weights outside a shrunk range
  clamp to the end codes.

Output invariant (what lets the result travel through every float-weight path of
rtllm: quantization on load, ``rtllm quantize`` and the dequantizing forward of a
float model during sequential calibration): the returned float weight
``(q - zero) * scale`` re-quantized by round-to-nearest
(:func:`~rtllm.quantization.rtn.quantize_groupwise_asymmetric` /
:func:`~rtllm.quantization.rtn.quantize_groupwise_symmetric`) gives back exactly the
same codes and zeros, and scales equal up to float32 rounding. It holds because every
(row, group) contains its grid's end codes, so that RTN finds the very same range:
``0`` where ``zero > 0`` and ``2**bits - 1`` where ``zero < 2**bits - 1`` (the other
end is 0.0 itself), symmetric ``+qmax`` or ``-qmax`` (``qmax = 2**(bits-1) - 1``).
Each needed end has a keeper, the element that set that end of the range when the
grid was computed (``argmin`` / ``argmax``, symmetric ``argmax |w|``), which is
quantized to that end code whatever the error feedback did to it since (its rounding
error is fed back like any other). In natural order the keeper always is (it got no
more than a few steps of feedback since its grid was computed); in act order, where it
may have received much more, only when its end code has not come out of the group yet
(the smallest / largest code each (row, group) received so far is tracked).
Symmetric codes stay in ``[-qmax, qmax]`` (RTN never produces ``-qmax - 1``). A group
whose range is 0 at grid time is quantized to 0.

The loop itself (:func:`prepare`, :func:`column_order`, :func:`error_feedback`) does
not know the grid: a rounding step (:data:`RoundColumn`) rounds one column and keeps
its codes. :func:`gptq_quantize` gives it the integer grids above,
:func:`rtllm.quantization.gptq_fp8.gptq_quantize_fp8` the FP8 E4M3 grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rtllm.quantization.packing import GroupwiseWeights

logger = logging.getLogger(__name__)

#: Columns per lazy-update block.
BLOCK = 128
#: Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal.
DAMP = 0.01
#: A grid search over range factors: 1.0, 0.95, ..., 0.75.
SHRINK_GRID = tuple(1.0 - i / 20 for i in range(6))
#: Default of :func:`gptq_quantize`'s ``act_order``: columns in order of decreasing
#: ``diag(H)`` with static groups (module doc). On by default, with the grid search:
#: W4A16_AWQ int4 g64 on the embedded SmolLM2-135M, 20,480 held-out tokens, 128 x 512
#: calibration tokens (benchmarks/RESULTS.md): +9.6 % perplexity in natural order with
#: min / max grids, +6.1 % in act order, +4.6 % in act order with the grid search.
ACT_ORDER = True
#: Default of :func:`gptq_quantize`'s ``grid_shrinks``: range factors tried per (row,
#: group) besides 1.0 (module doc); empty: the plain min / max grid.
GRID_SHRINKS: tuple[float, ...] = SHRINK_GRID


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
class _Grids:
    """Grids of ``G`` groups, one per (group, row): tensors ``[G, out]``."""

    scale: torch.Tensor  # float32, > 0
    zero: torch.Tensor  # float32 integer values (unsigned code of 0.0)
    keep_low: torch.Tensor  # int64 input channel keeping the low end code; -1: none
    keep_high: torch.Tensor  # int64 input channel keeping the high end code; -1: none
    empty: torch.Tensor  # bool: range 0, every element quantized to ``zero``


def _codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """Round-to-nearest unsigned codes of ``w`` on the grid ``(scale, zero)``."""
    return (torch.round(w / scale) + zero).clamp_(low, high)


def _grids(
    wt: torch.Tensor,
    importance: torch.Tensor,
    first: torch.Tensor,
    bits: int,
    zero_point: bool,
    shrinks: Sequence[float],
) -> _Grids:
    """The grids of groups ``wt`` ``[G, g, out]`` (transposed weights), with rtn's
    arithmetic and the range factor of ``(1.0, *shrinks)`` that minimises each (row,
    group)'s error weighted by ``importance`` ``[G, g]`` (module doc); ``first``
    ``[G]``: each group's first input channel (to name the keepers)."""
    d = importance[:, :, None]
    if zero_point:
        qmax = float((1 << bits) - 1)
        low, high = 0.0, qmax
        lo0 = wt.amin(dim=1).clamp(max=0.0)
        hi0 = wt.amax(dim=1).clamp(min=0.0)
        empty = hi0 == lo0
    else:
        qmax = float((1 << (bits - 1)) - 1)
        offset = float(1 << (bits - 1))
        low, high = offset - qmax, offset + qmax
        amax0, arg = wt.abs().max(dim=1)
        empty = amax0 == 0
    factors = (1.0, *(a for a in shrinks if a != 1.0))
    best_err: torch.Tensor | None = None
    for factor in factors:
        if zero_point:
            lo, hi = lo0 * factor, hi0 * factor
            span = hi - lo
            scale = torch.where(span > 0, span / qmax, torch.ones_like(span))
            zero = torch.round(-lo / scale).clamp_(0, qmax)
        else:
            amax = amax0 * factor
            scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
            zero = torch.full_like(scale, offset)
        if len(factors) == 1:  # no search
            best_scale, best_zero = scale, zero
            break
        q = _codes(wt, scale[:, None], zero[:, None], low, high)
        err = (d * (wt - (q - zero[:, None]) * scale[:, None]).square()).sum(dim=1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:  # strictly better only: ties keep the wider range
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    base = first[:, None]
    none = torch.full_like(base, -1)
    if zero_point:
        # zero > 0 needs lo < 0, which the argmin set; zero < qmax needs hi > 0.
        keep_low = torch.where(best_zero > 0, wt.argmin(dim=1) + base, none)
        keep_high = torch.where(best_zero < qmax, wt.argmax(dim=1) + base, none)
    else:
        sign = wt.gather(1, arg[:, None]).squeeze(1)
        keep_low = torch.where(sign < 0, arg + base, none)
        keep_high = torch.where(sign > 0, arg + base, none)
    return _Grids(best_scale, best_zero, keep_low, keep_high, empty)


def _store(grids: _Grids, index: int | slice, part: _Grids) -> None:
    """Write ``part``'s grids over groups ``index`` of ``grids``."""
    for name in _Grids.__slots__:
        getattr(grids, name)[index] = getattr(part, name)


#: One rounding step of :func:`error_feedback`: ``(position, channel, w, ahead)``, with
#: ``w`` ``[out]`` the column of input channel ``channel`` (quantized at ``position``)
#: holding all feedback from the columns before it, and ``ahead(n)`` ``[n', out]`` the
#: current weights of positions ``position .. position + n - 1`` (those after
#: ``position`` not yet updated by ``position``'s own error), returns the column's
#: rounded value (float32 ``[out]``) whose error is fed back.
RoundColumn = Callable[[int, int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


def prepare(
    weight: torch.Tensor, h: torch.Tensor, zero_dead: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(wt, h, importance)``: the transposed float32 weight ``[in, out]`` (a weight
    column, one input channel, is a contiguous row), a copy of ``h`` whose never-seen
    channels (``H[i, i] == 0``) get ``H[i, i] = 1`` (and, with ``zero_dead``, weight 0)
    and ``diag(H)``."""
    wt = weight.float().t().contiguous()
    h = h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    if zero_dead:
        wt[dead] = 0.0
    return wt, h, torch.diagonal(h).clone()


def column_order(importance: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Input channels in quantization order: by decreasing ``diag(H)`` (act order,
    stable) or natural."""
    if act_order:
        return torch.argsort(importance, descending=True, stable=True)
    return torch.arange(importance.numel(), device=importance.device)


@torch.no_grad()
def error_feedback(
    wt: torch.Tensor,
    h: torch.Tensor,
    order: torch.Tensor,
    round_column: RoundColumn,
    damp: float | None = None,
    block: int = BLOCK,
) -> None:
    """GPTQ's loop (module doc) over the columns of the transposed weight ``wt``
    ``[in, out]`` (:func:`prepare`) in ``order`` with Hessian ``h`` ``[in, in]``; the
    grid is ``round_column``'s (:data:`RoundColumn`), which also keeps the codes.
    ``damp`` None: :data:`DAMP`."""
    wt, h = wt[order], h[order][:, order]
    channels = order.tolist()  # input channel quantized at each position
    u = _inverse_cholesky(h, DAMP if damp is None else damp)
    in_features = wt.shape[0]
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block = wt[start:stop].clone()  # receives this block's in-block updates
        errors = torch.empty_like(w_block)
        u_block = u[start:stop, start:stop]
        for j in range(stop - start):

            def ahead(count: int, pos: int = start + j, block_rows: torch.Tensor = w_block[j:],
                      stop: int = stop) -> torch.Tensor:
                # Updated in-block columns, then columns after the block, updated up to it.
                end = pos + count
                rows = block_rows[:count]
                return rows if end <= stop else torch.cat([rows, wt[stop:end]])

            w = w_block[j]
            err = (w - round_column(start + j, channels[start + j], w, ahead)) / u_block[j, j]
            # Invariant: columns > j of the block hold all feedback from columns <= j.
            w_block[j + 1 :].addr_(u_block[j, j + 1 :], err, alpha=-1.0)
            errors[j] = err
        # Invariant: columns >= stop hold all feedback from columns < stop.
        wt[stop:].addmm_(u[start:stop, stop:].t(), errors, alpha=-1.0)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    damp: float | None = None,
    block: int = BLOCK,
    act_order: bool | None = None,
    grid_shrinks: Sequence[float] | None = None,
) -> GptqResult:
    """GPTQ rounding of ``weight`` ``[out, in]`` for inputs with Hessian ``h``
    ``[in, in]`` (module doc); ``group_size=-1``: one group per row. None means the
    module default: ``damp`` :data:`DAMP`, ``act_order`` :data:`ACT_ORDER` (columns
    by decreasing ``diag(H)``, static groups), ``grid_shrinks`` :data:`GRID_SHRINKS`
    (range factors in ``(0, 1]`` tried besides 1.0; empty: plain min / max grids).

    Raises:
        ValueError: bad shapes, a group size that does not divide ``in``, a range
            factor outside ``(0, 1]``, or a Hessian that no dampening makes positive
            definite.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if weight.dim() != 2 or h.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(h.shape)} disagree")
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    if group <= 0 or in_features % group:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    act_order = ACT_ORDER if act_order is None else act_order
    shrinks = tuple(GRID_SHRINKS if grid_shrinks is None else grid_shrinks)
    if not all(0.0 < a <= 1.0 for a in shrinks):
        raise ValueError(f"grid range factors must lie in (0, 1], got {shrinks}")
    wt, h, importance = prepare(weight, h, zero_dead=True)
    num_groups = in_features // group
    device = wt.device
    # Unsigned codes rounding may give: [0, 2**bits - 1]; symmetric [offset - qmax,
    # offset + qmax] with offset 2**(bits-1), qmax 2**(bits-1) - 1.
    low, high = (0.0 if zero_point else 1.0), float((1 << bits) - 1)
    starts = torch.arange(0, in_features, group, device=device)
    if act_order:  # static groups: every grid now, from the input weights
        grids = _grids(
            wt.view(num_groups, group, out_features), importance.view(num_groups, group),
            starts, bits, zero_point, shrinks,
        )
    else:
        grids = _Grids(
            torch.empty(num_groups, out_features, device=device),
            torch.empty(num_groups, out_features, device=device),
            torch.empty(num_groups, out_features, dtype=torch.long, device=device),
            torch.empty(num_groups, out_features, dtype=torch.long, device=device),
            torch.empty(num_groups, out_features, dtype=torch.bool, device=device),
        )
    codes = torch.empty(in_features, out_features, device=device)
    # Smallest / largest code each (group, row) has received so far: an end code is
    # present once they reach it (module doc's invariant).
    seen_low = torch.full((num_groups, out_features), high + 1, device=device)
    seen_high = torch.full((num_groups, out_features), low - 1, device=device)

    def round_column(_pos: int, col: int, w: torch.Tensor, ahead: Callable[[int], torch.Tensor]) -> torch.Tensor:
        g = col // group
        if not act_order and col % group == 0:
            # The group's current weights (natural order: position == channel).
            part = _grids(
                ahead(group)[None], importance[None, col : col + group], starts[g : g + 1],
                bits, zero_point, shrinks,
            )
            _store(grids, slice(g, g + 1), part)
        scale, zero = grids.scale[g], grids.zero[g]
        q = _codes(w, scale, zero, low, high)
        force_low, force_high = grids.keep_low[g] == col, grids.keep_high[g] == col
        if act_order:  # static grids: force a keeper only while its end is missing
            need_low, need_high = seen_low[g] > low, seen_high[g] < high
            if not zero_point:  # one end code, either sign, is enough
                need_low = need_high = need_low & need_high
            force_low, force_high = force_low & need_low, force_high & need_high
        q = torch.where(force_low, low, q)
        q = torch.where(force_high, high, q)
        q = torch.where(grids.empty[g], zero, q)
        if act_order:
            torch.minimum(seen_low[g], q, out=seen_low[g])
            torch.maximum(seen_high[g], q, out=seen_high[g])
        codes[col] = q
        return (q - zero) * scale

    error_feedback(wt, h, column_order(importance, act_order), round_column, damp, block)
    q = codes.t().to(torch.uint8)
    scales, zeros = grids.scale.t().contiguous(), grids.zero.t().contiguous()
    expanded = torch.repeat_interleave
    dequantized = (codes.t() - expanded(zeros, group, dim=1)) * expanded(scales, group, dim=1)
    return GptqResult(GroupwiseWeights(q, zeros.to(torch.int32), scales), dequantized)


def output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(delta H delta^T)``: the summed squared output error (up to the Hessian's
    normalisation) of a weight error ``delta`` ``[out, in]``."""
    d = delta.float()
    return float(((d @ h.float()) * d).sum())
