"""Round-to-nearest (RTN) quantizers and their inverses, CPU reference code.

Shapes (weights are ``[out, in]`` like ``nn.Linear.weight``; ``G = in / group_size``):

=========================  ==================  ==========================================
quantizer                  ``q``               scale / zero
=========================  ==================  ==========================================
int8 per channel           int8 ``[out, in]``  float32 ``[out, 1]``
int groupwise, symmetric   int8 ``[out, in]``  float32 ``[out, G]``
int groupwise, zero point  uint8 ``[out, in]`` float32 ``[out, G]``, int32 zero ``[out, G]``
FP8 per tensor             fp8 ``[out, in]``   float32 ``[]`` (0-dim)
FP8 per channel            fp8 ``[out, in]``   float32 ``[out, 1]``
per token (int8 / FP8)     ``[..., K]``        float32 ``[..., 1]``
=========================  ==================  ==========================================

Per-channel is groupwise with one group (``G = 1``), so :func:`dequantize` serves every
row: ``w = (q - zero) * scale`` with the scale (and zero) repeated over each group.

Invariants: scales are strictly positive and finite. A row, group or token whose
values are all zero gets scale 1 (its ``q`` is 0, so it dequantizes exactly to 0)
rather than the 0 that ``amax / qmax`` would give and that would turn ``w / scale``
into NaN. Weight quantizers reject non-finite input with ``ValueError``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite FP8 E4M3 (fn variant) value.
FP8_MAX = 448.0
INT8_MAX = 127


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor, got {weight.dtype}")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or inf values")
    return w


def _scale_from_range(span: torch.Tensor, qmax: float) -> torch.Tensor:
    # span is amax (symmetric) or max - min (asymmetric), >= 0. Zero spans get scale 1.
    return torch.where(span > 0, span / qmax, torch.ones_like(span))


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, G, group]``; ``group_size=-1``: one group."""
    out_features, in_features = w.shape
    group = in_features if group_size == -1 else group_size
    if group <= 0 or in_features % group != 0:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return w.reshape(out_features, in_features // group, group)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output row: ``scale = amax / 127``.

    Returns ``(q int8 [out, in] in [-127, 127], scale float32 [out, 1])``.
    """
    w = _check_weight(weight)
    scale = _scale_from_range(w.abs().amax(dim=1, keepdim=True), INT8_MAX)
    q = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_groupwise_symmetric(
    weight: torch.Tensor, group_size: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric groupwise quantization along the input dim.

    ``scale = amax / (2**(bits-1) - 1)`` per group; ``q = clamp(round(w / scale))`` in
    ``[-2**(bits-1), 2**(bits-1) - 1]`` (the most negative code is never produced by
    rounding, only allowed). ``group_size=-1`` means per channel.

    Returns ``(q int8 [out, in], scale float32 [out, G])``.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = _groups(_check_weight(weight), group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = _scale_from_range(w.abs().amax(dim=2, keepdim=True), qmax)
    q = torch.round(w / scale).clamp_(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(weight.shape), scale.squeeze(2)


def quantize_groupwise_asymmetric(
    weight: torch.Tensor, group_size: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (zero-point) groupwise quantization along the input dim.

    Each group's range ``[min(w_min, 0), max(w_max, 0)]`` (widened to hold 0, so that 0
    is exactly representable and the zero fits in ``bits``) maps onto
    ``[0, 2**bits - 1]``: ``scale = range / (2**bits - 1)``, ``zero = round(-min /
    scale)``, ``q = clamp(round(w / scale) + zero)``. ``group_size=-1``: per channel.

    Returns ``(q uint8 [out, in], scale float32 [out, G], zero int32 [out, G])``, with
    ``w ~= (q - zero) * scale``.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = _groups(_check_weight(weight), group_size)
    qmax = 2**bits - 1
    lo = w.amin(dim=2, keepdim=True).clamp(max=0.0)
    hi = w.amax(dim=2, keepdim=True).clamp(min=0.0)
    scale = _scale_from_range(hi - lo, qmax)
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    q = (torch.round(w / scale) + zero).clamp_(0, qmax).to(torch.uint8)
    return q.reshape(weight.shape), scale.squeeze(2), zero.squeeze(2).to(torch.int32)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to ``[-448, 448]`` and rounded to FP8 E4M3.

    ``scale`` broadcasts against ``x``. Saturation is explicit because casting an
    out-of-range value to ``float8_e4m3fn`` (which has no inf) is not guaranteed to clamp.
    """
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 with one scale: ``scale = amax / 448``.

    Returns ``(q float8_e4m3fn [out, in], scale float32 [])``.
    """
    w = _check_weight(weight)
    scale = _scale_from_range(w.abs().amax(), FP8_MAX)
    return quantize_fp8(w, scale), scale


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 with one scale per output row: ``scale = amax_row / 448``.

    Returns ``(q float8_e4m3fn [out, in], scale float32 [out, 1])``.
    """
    w = _check_weight(weight)
    scale = _scale_from_range(w.abs().amax(dim=1, keepdim=True), FP8_MAX)
    return quantize_fp8(w, scale), scale


class Fp8Tokens(NamedTuple):
    """Activations already quantized per token: what a kernel that fuses the
    quantization into its output (RMSNorm, SiLU-mul) hands to an FP8 linear."""

    codes: torch.Tensor  # float8_e4m3fn [M, K]
    scale: torch.Tensor  # float32 [M, 1]: row m is codes[m] * scale[m]
    dtype: torch.dtype  # the activations' dtype before quantization (the output's default)

    @classmethod
    def quantize(cls, x: torch.Tensor) -> Fp8Tokens:
        """The rows of ``x`` ``[..., K]`` quantized per token (PyTorch; the fused kernels
        give the same codes and scales)."""
        codes, scale = quantize_per_token_fp8(x.reshape(-1, x.shape[-1]))
        return cls(codes, scale, x.dtype)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 activation quantization, one scale per token (row of the last dim).

    Returns ``(q float8_e4m3fn [..., K], scale float32 [..., 1])``.
    """
    scale = _scale_from_range(x.float().abs().amax(dim=-1, keepdim=True), FP8_MAX)
    return quantize_fp8(x, scale), scale


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 activation quantization, one scale per token.

    Returns ``(q int8 [..., K] in [-127, 127], scale float32 [..., 1])``.
    """
    xf = x.float()
    scale = _scale_from_range(xf.abs().amax(dim=-1, keepdim=True), INT8_MAX)
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _expand_groups(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """Repeat a ``[..., G]`` group tensor to ``[..., in_features]`` (no-op for G = 1)."""
    num_groups = t.shape[-1]
    if num_groups == 1 or num_groups == in_features:
        return t
    if in_features % num_groups != 0:
        raise ValueError(f"{num_groups} groups do not divide {in_features} input channels")
    return t.repeat_interleave(in_features // num_groups, dim=-1)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of every quantizer here: ``(q - zero) * scale`` computed in float32.

    ``scale`` (and ``zero``) is 0-dim (per tensor), ``[..., 1]`` (per channel or per
    token) or ``[out, G]`` (groupwise, expanded over groups of ``in / G`` channels).
    """
    in_features = q.shape[-1]
    num_groups = scale.shape[-1] if scale.dim() > 0 else 1
    if 1 < num_groups < in_features and q.dim() == 2 and in_features % num_groups == 0:
        # Groupwise: broadcast [out, G, 1] over a [out, G, group] view rather than
        # materialising expanded [out, in] scales and zeros (same arithmetic).
        qf = q.float().view(q.shape[0], num_groups, -1)
        if zero is not None:
            qf = qf - zero.float().unsqueeze(-1)
        return (qf * scale.float().unsqueeze(-1)).view(q.shape).to(dtype)
    qf = q.float()
    if zero is not None:
        qf = qf - _expand_groups(zero.float(), in_features)
    if scale.dim() > 0:
        scale = _expand_groups(scale.float(), in_features)
    return (qf * scale.float()).to(dtype)
