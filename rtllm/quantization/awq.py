"""AWQ's searches on one float linear layer (fused layers as one): the per-input-channel
scale and the per-group weight clipping range.

Both minimise the error of the layer's output on calibration inputs ``x``, with ``Q``
the groupwise int4 fake quantizer (:func:`fake_quantize`, the arithmetic of the real
quantizers):

* **scale** (:func:`awq_search_scale`): ``s = base**alpha`` normalised by
  ``sqrt(max(s) * min(s))``, ``base`` a per-channel activation statistic (the largest
  ``|x|`` by default; see ``smoothing.AWQ_BASE``), for ``alpha`` in
  ``AWQ_ALPHA_GRID``, keeping the ``s`` whose ``Q(W * s) / s`` gives the smallest
  summed squared output error ``tr(D X^T X D^T)``, ``D = Q(W * s) / s - W`` (over every
  calibration row at once through the Gram matrix; ``alpha = 0`` is plain
  round-to-nearest). ``Q`` is round-to-nearest, or GPTQ with ``gptq=True``. In
  W4A16_AWQ the chosen scaled weight is then rounded by GPTQ
  (:func:`rtllm.quantization.smoothing.calibrate_sequentially`): "AWQ scale search +
  GPTQ rounding";
* **clipping** (:func:`awq_search_clip`, after scaling; off unless :data:`AWQ_CLIP`): each group's quantization range
  ``[lo, hi]`` (``lo = min(w_min, 0)``, ``hi = max(w_max, 0)``; symmetric: ``[-amax,
  amax]``) shrinks to ``[r * lo, r * hi]`` for ``r`` in ``AWQ_CLIP_GRID``; each
  (output row, group) keeps the ``r`` minimising its own contribution to the output
  error, ``mean_n (x_g . (Q(clip_r(w_g)) - w_g))**2``, and the float weight is clamped
  to that range, so that the quantizer run later sees the chosen range.

Clipping rows of ``q``/``k`` is skipped by default (AutoAWQ does the same: attention
logits amplify their error); :data:`CLIP_QK` turns it on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from rtllm.quantization.config import QuantConfig
from rtllm.quantization.gptq import gptq_quantize, output_error

logger = logging.getLogger(__name__)

AWQ_ALPHA_GRID = tuple(i / 10 for i in range(11))
AWQ_CLIP_GRID = tuple(1.0 - i / 20 for i in range(11))  # 1.0, 0.95, ..., 0.5
#: Run the clipping search in :func:`rtllm.quantization.smoothing.smooth_model`. Off:
#: on SmolLM2-135M (g64, 8 x 256 calibration tokens, first 2048 held-out tokens) it
#: lowers every layer's in-sample output error (by 15-40%) but not perplexity: 33.21
#: with it, 32.90 without (float 29.05), and it multiplies the search time.
AWQ_CLIP = False
#: Also search clipping ranges of the q and k rows of a fused qkv layer.
CLIP_QK = False
#: Output rows per chunk of the clipping search (bounds its memory).
_CLIP_CHUNK = 1024


def _group_size(config: QuantConfig, in_features: int) -> int:
    return in_features if config.weight_group_size == -1 else config.weight_group_size


def fake_quantize(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """``dequantize(quantize(weight))`` for the groupwise int4 AWQ layout.

    The same arithmetic as :func:`quantize_groupwise_asymmetric` /
    :func:`quantize_groupwise_symmetric` then :func:`dequantize` (a test checks it), in
    fewer passes and without their input checks: the searches call it many times.
    """
    out_features, in_features = weight.shape
    group = _group_size(config, in_features)
    w = weight.float().reshape(out_features, in_features // group, group)
    if config.has_zero_point:
        lo = w.amin(dim=2, keepdim=True).clamp(max=0.0)
        span = w.amax(dim=2, keepdim=True).clamp(min=0.0) - lo
        scale = torch.where(span > 0, span / 15, torch.ones_like(span))
        zero = torch.round(-lo / scale).clamp_(0, 15)
        q = (torch.round(w / scale) + zero).clamp_(0, 15)
        return ((q - zero) * scale).reshape(weight.shape)
    amax = w.abs().amax(dim=2, keepdim=True)
    scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    return (torch.round(w / scale).clamp_(-8, 7) * scale).reshape(weight.shape)


def awq_search_scale(
    weight: torch.Tensor,
    gram: torch.Tensor,
    base: torch.Tensor,
    config: QuantConfig,
    gptq: bool = False,
    sum_errors: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The AWQ scale ``s`` ``[in]`` with the smallest output error (module doc).

    ``gram`` is ``X^T X`` ``[in, in]`` of the calibration inputs (the error of a weight
    error ``D`` is ``tr(D X^T X D^T)``, the squared output error summed over every
    input row); ``base`` the per-channel activation statistic (may differ from the
    inputs' own: o_proj's is reduced over q heads sharing a KV head). With ``gptq``
    each candidate is rounded by GPTQ (:func:`rtllm.quantization.gptq.gptq_quantize`,
    Hessian ``diag(1/s) X^T X diag(1/s)`` of the scaled inputs ``x / s``) instead of
    round-to-nearest: the search then picks the scale for the rounding that follows.
    ``sum_errors`` adds the candidates' errors ``[len(AWQ_ALPHA_GRID)]`` over the ranks
    that hold the layer's other parts (tensor parallelism), so that every rank picks
    the same scale.
    """
    w = weight.float()
    g = gram.float().to(w.device)
    base = base.float().to(w.device).clamp(min=1e-4)
    scales, errors = [], []
    for alpha in AWQ_ALPHA_GRID:
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        if gptq:
            h = g / (s[:, None] * s[None, :])
            rounded = gptq_quantize(
                w * s, h, 4, config.weight_group_size, config.has_zero_point
            ).dequantized
        else:
            rounded = fake_quantize(w * s, config)
        scales.append(s)
        errors.append(output_error(rounded / s - w, g))
    totals = torch.tensor(errors, dtype=torch.float64, device=w.device)
    if sum_errors is not None:
        totals = sum_errors(totals)
    best = int(torch.argmin(totals))  # the first of equal errors, as a strict < scan
    logger.debug("AWQ alpha %.2f, error %.3g", AWQ_ALPHA_GRID[best], float(totals[best]))
    return scales[best]


def _clipped(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratio: float) -> torch.Tensor:
    return torch.maximum(torch.minimum(w, hi * ratio), lo * ratio)


@torch.no_grad()
def awq_search_clip(
    weight: torch.Tensor, x: torch.Tensor, config: QuantConfig, rows: slice | None = None
) -> torch.Tensor:
    """Clamp ``weight`` ``[out, in]`` in place to each group's best range (module doc)
    for inputs ``x`` ``[n, in]``; ``rows`` limits the search to those output rows.
    Returns the chosen ratio per (row, group) ``[rows, G]`` (float32)."""
    out_features, in_features = weight.shape
    group = _group_size(config, in_features)
    num_groups = in_features // group
    rows = rows or slice(0, out_features)
    xg = x.float().to(weight.device).reshape(-1, num_groups, group)
    chosen = []
    for start in range(rows.start, rows.stop, _CLIP_CHUNK):
        stop = min(start + _CLIP_CHUNK, rows.stop)
        w = weight[start:stop].float().reshape(stop - start, num_groups, group)
        if config.has_zero_point:
            lo = w.amin(dim=2, keepdim=True).clamp(max=0.0)
            hi = w.amax(dim=2, keepdim=True).clamp(min=0.0)
        else:
            hi = w.abs().amax(dim=2, keepdim=True)
            lo = -hi
        best_err = torch.full((stop - start, num_groups), float("inf"), device=w.device)
        best_ratio = torch.ones_like(best_err)
        best_w = w
        for ratio in AWQ_CLIP_GRID:
            clipped = _clipped(w, lo, hi, ratio)
            diff = fake_quantize(clipped.reshape(stop - start, -1), config).reshape_as(w) - w
            err = torch.einsum("ngk,ogk->gon", xg, diff).pow(2).mean(dim=2).t()
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
            best_w = torch.where(better.unsqueeze(2), clipped, best_w)
        weight[start:stop] = best_w.reshape(stop - start, in_features).to(weight.dtype)
        chosen.append(best_ratio)
    ratios = torch.cat(chosen)
    logger.debug("AWQ clip: mean ratio %.3f", float(ratios.mean()))
    return ratios
