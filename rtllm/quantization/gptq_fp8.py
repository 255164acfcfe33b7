"""GPTQ with an FP8 E4M3 grid: FP8 weight rounding with error feedback.

The loop is GPTQ's (:mod:`rtllm.quantization.gptq`: the Hessian ``H = 2 X^T X`` of
calibration inputs, dampening, lazy block updates, act order by default); only the
grid differs from the integer path's:

* the scales are fixed up front from the *input* weight, exactly as round-to-nearest
  (:func:`~rtllm.quantization.rtn.quantize_fp8_per_tensor` /
  :func:`~rtllm.quantization.rtn.quantize_fp8_per_channel`) computes them: ``amax /
  448`` of the whole weight (per tensor), of each row (per channel) or of each block of
  consecutive rows (``row_blocks``: the shards of a fused linear that ``rtllm
  quantize`` writes as separate per-tensor FP8 tensors); ``1`` where ``amax`` is 0;
* each column (one input channel, after the feedback of the columns before it) is
  rounded to the nearest ``float8_e4m3fn`` value of ``w / scale``, saturated to
  ``[-448, 448]``, as RTN rounds; its error is fed back as GPTQ does;
* input channels the calibration never saw (``H[i, i] == 0``) keep their weights
  (the integer path zeroes them): with ``H[i, i] = 1`` and no off-diagonal term they
  neither receive nor give feedback, so they are rounded to nearest.

Output invariant (what lets the result travel through every float-weight path, as in
:mod:`rtllm.quantization.gptq`): re-quantizing the returned float weight with RTN, in
float32 or cast to the input weight's dtype (bfloat16: the model's float forward during
sequential calibration holds it so), gives back exactly the same FP8 codes and the
same scales. It holds because

* each scale block keeps its ``amax``: its keeper, the element that set it (``argmax
  |w|``, first in row-major order), is quantized to ``±448`` (its own sign) whatever
  the feedback did to it, unless the block already received a ``±448`` code before
  the keeper's turn (tracked per block, as the integer path tracks end codes); and
  every ``±448`` code dequantizes to ``±amax`` itself (not ``448 * scale``, which may
  differ from ``amax`` by a float32 rounding), so RTN finds ``amax`` again and computes
  the very same ``scale = amax / 448``; ``amax`` is a value of the input weight, so
  its dtype holds it exactly;
* every other code ``q`` dequantizes to ``q * scale`` (float32), and ``|q| <= 416``
  keeps it below ``amax``; RTN's ``(q * scale) / scale`` is ``q`` up to two float32
  roundings, and a bfloat16 cast moves it by at most ``2**-9`` relative, while the
  nearest rounding boundary of E4M3 lies at least ``1/32`` relative away for normal
  values (``2**-10`` absolute for subnormal codes, spaced ``2**-9``), so the same code
  comes back.

float16 weights keep the invariant except for codes whose value ``q * scale`` falls
under float16's normal range (``2**-14``) with ``scale < 2**-15``, where float16's
absolute rounding (``2**-25``) may reach half an FP8 step; such weights are ~1e-8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rtllm.quantization.gptq import ACT_ORDER, BLOCK, column_order, error_feedback, prepare
from rtllm.quantization.rtn import FP8_DTYPE, FP8_MAX


@dataclass(slots=True)
class Fp8GptqResult:
    """GPTQ's FP8 rounding of one weight ``[out, in]``.

    ``q`` float8_e4m3fn ``[out, in]``; ``scale`` float32 as RTN returns it: ``[]`` (per
    tensor), ``[out, 1]`` (per channel, or one scale per row block repeated over its
    rows); ``dequantized`` float32 ``[out, in]``: ``q * scale`` with every ``±448``
    code at ``±amax`` of its block (module doc's invariant).
    """

    q: torch.Tensor
    scale: torch.Tensor
    dequantized: torch.Tensor


def _row_blocks(out_features: int, per_channel: bool, row_blocks: Sequence[int] | None) -> torch.Tensor:
    """The scale block of each row ``[out]`` (int64)."""
    if per_channel:
        if row_blocks is not None:
            raise ValueError("row_blocks and per_channel exclude each other")
        return torch.arange(out_features)
    sizes = [out_features] if row_blocks is None else list(row_blocks)
    if any(n <= 0 for n in sizes) or sum(sizes) != out_features:
        raise ValueError(f"row_blocks {sizes} do not split {out_features} rows")
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


@torch.no_grad()
def gptq_quantize_fp8(
    weight: torch.Tensor,
    h: torch.Tensor,
    per_channel: bool = False,
    row_blocks: Sequence[int] | None = None,
    damp: float | None = None,
    block: int = BLOCK,
    act_order: bool | None = None,
) -> Fp8GptqResult:
    """GPTQ rounding of ``weight`` ``[out, in]`` to FP8 E4M3 for inputs with Hessian
    ``h`` ``[in, in]`` (module doc): one scale for the whole weight, per row
    (``per_channel``) or per block of ``row_blocks[i]`` consecutive rows. None means
    :mod:`rtllm.quantization.gptq`'s default (``damp``, ``act_order``).

    Raises:
        ValueError: bad shapes, row blocks that do not split the rows, non-finite
            weights, or a Hessian that no dampening makes positive definite.
    """
    if weight.dim() != 2 or h.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(h.shape)} disagree")
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise ValueError("weight must be a float tensor with finite values")
    out_features, in_features = weight.shape
    act_order = ACT_ORDER if act_order is None else act_order
    wt, h, importance = prepare(weight, h, zero_dead=False)
    device = wt.device
    block_of = _row_blocks(out_features, per_channel, row_blocks).to(device)
    num_blocks = int(block_of[-1]) + 1 if out_features else 0
    # amax and keeper of each block, exactly as RTN: scale = amax / 448 (1 where 0).
    row_amax, row_arg = wt.abs().max(dim=0)  # per row; first max in row order
    amax = torch.zeros(num_blocks, device=device).scatter_reduce(0, block_of, row_amax, "amax")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    row_scale = scale[block_of]
    # The keeper row of each block: its first row reaching the block's amax.
    rows = torch.arange(out_features, device=device)
    at_max = (row_amax == amax[block_of]) & (amax[block_of] > 0)
    first = torch.full((num_blocks,), out_features, device=device)
    first = first.scatter_reduce(0, block_of[at_max], rows[at_max], "amin")
    keep_col = torch.where(first[block_of] == rows, row_arg, torch.full_like(row_arg, -1))
    keep_code = torch.sign(wt[row_arg, rows]) * FP8_MAX  # the keeper's end code, its sign
    seen = torch.zeros(num_blocks, dtype=torch.bool, device=device)  # a ±448 code came out
    codes = torch.empty(in_features, out_features, device=device)

    def round_column(_pos: int, col: int, w: torch.Tensor, _ahead: Callable[[int], torch.Tensor]) -> torch.Tensor:
        q = (w / row_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
        force = (keep_col == col) & ~seen[block_of]
        q = torch.where(force, keep_code, q)
        seen[block_of[q.abs() == FP8_MAX]] = True
        codes[col] = q
        return q * row_scale

    error_feedback(wt, h, column_order(importance, act_order), round_column, damp, block)
    q = codes.t().contiguous()
    dequantized = q * row_scale[:, None]
    ends = q.abs() == FP8_MAX
    dequantized = torch.where(ends, torch.sign(q) * amax[block_of][:, None], dequantized)
    if per_channel or num_blocks > 1:
        out_scale = row_scale[:, None].contiguous()
    else:
        out_scale = scale.reshape(())
    return Fp8GptqResult(q.to(FP8_DTYPE), out_scale, dequantized)
