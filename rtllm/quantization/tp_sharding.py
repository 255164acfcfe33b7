"""A tensor-parallel rank's slice of a checkpoint tensor of a quantized linear layer.

A column-parallel rank keeps a range of *output* features, a row-parallel rank a range
of *input* features. Each checkpoint tensor stores those features along one axis, at
some number of features per element: 1 for plain tensors, the packing factor for
codes packed into int32 words, the group size for per-group scales and zeros. The
rank's range divided by that number is the slice it reads (lazily, so it reads only
its part of the file). Tensors without that axis (a per-tensor scale, a per-output
scale seen by a row-parallel rank, GPTQ's ``g_idx`` seen by a column-parallel rank)
are the same on every rank.

Layouts (see :mod:`rtllm.quantization.packing`):

=====================  ==========================  ===============================
tensor                 output features             input features
=====================  ==========================  ===============================
AWQ ``qweight``        axis 1, 32/bits per word    axis 0
AWQ ``qzeros``         axis 1, 32/bits per word    axis 0, one row per group
AWQ/GPTQ ``scales``    axis 1                      axis 0, one row per group
GPTQ ``qweight``       axis 1                      axis 0, 32/bits per word
GPTQ ``qzeros``        axis 1, 32/bits per word    axis 0, one row per group
GPTQ ``g_idx``         (replicated)                axis 0, renumbered from 0
``weight`` (fp8/int)   axis 0                      axis 1
``weight_scale/zero``  axis 0 (unless per tensor)  axis 1 per group (replicated
                                                   when one group spans the row)
``input_scale``        (replicated)                (replicated)
``pre_quant_scale``    (replicated)                axis 0
``bias``               axis 0                      (replicated: added once, after
                                                   the all-reduce)
=====================  ==========================  ===============================
"""

from __future__ import annotations

from math import prod
from typing import Any, Literal

from rtllm.quantization.config import QuantAlgo, QuantConfig

FeatureKind = Literal["out", "in"]

_PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _bits(config: QuantConfig) -> int:
    return 8 if config.quant_algo == QuantAlgo.W8A16_GPTQ else 4


def _axis_and_units(
    config: QuantConfig, suffix: str, shape: tuple[int, ...], kind: FeatureKind, in_features: int
) -> tuple[int, int] | None:
    """``(axis, features per element)`` of ``kind`` features in this tensor, or None when
    the tensor does not vary along them (replicated)."""
    if suffix in _PACKED_SUFFIXES:
        awq = config.quant_algo == QuantAlgo.W4A16_AWQ
        per_word = 32 // _bits(config)
        if kind == "out":
            if suffix == "g_idx":
                return None
            packed_along_out = suffix == "qzeros" or (awq and suffix == "qweight")
            return 1, per_word if packed_along_out else 1
        if suffix == "g_idx":
            return 0, 1
        if suffix == "qweight":
            return 0, 1 if awq else per_word
        groups = shape[0]  # qzeros / scales: one row per group of inputs
        return None if groups == 1 else (0, in_features // groups)
    if suffix == "input_scale":
        return None
    if suffix == "pre_quant_scale":
        return None if kind == "out" else (0, 1)
    if suffix == "bias":
        return (0, 1) if kind == "out" else None
    if suffix == "weight":
        return (0, 1) if kind == "out" else (1, 1)
    if suffix in ("weight_scale", "weight_zero"):
        if prod(shape) == 1:
            return None  # one scale for the tensor
        if kind == "out":
            return 0, 1
        groups = shape[1] if len(shape) == 2 else 1
        return None if groups == 1 else (1, in_features // groups)
    raise NotImplementedError(
        f"checkpoint tensor '.{suffix}' of a quantized layer cannot be split for tensor parallelism yet"
    )


def shard_quantized_tensor(
    config: QuantConfig,
    prefix: str,
    suffix: str,
    tensor: Any,
    kind: FeatureKind,
    start: int,
    length: int,
    in_features: int,
) -> Any:
    """The part of checkpoint tensor ``<prefix>.<suffix>`` that holds features
    ``[start, start + length)`` of ``kind`` (a tensor or a lazy safetensors slice;
    ``in_features`` is the full, unsplit input size).

    Raises:
        ValueError: the range does not fall on whole packed words or groups.
    """
    shape = tuple(tensor.shape)
    rule = _axis_and_units(config, suffix, shape, kind, in_features)
    if rule is None:
        return tensor
    axis, units = rule
    if start % units or length % units:
        raise ValueError(
            f"{prefix}.{suffix}: the rank's {kind}put features [{start}, {start + length}) do not fall on "
            f"whole units of {units} (packed words or quantization groups); use a tensor_parallel_size "
            f"that splits them evenly"
        )
    part = tensor.narrow(axis, start // units, length // units)
    if suffix == "g_idx":
        # Group indices of the rank's inputs, counted from its first group (with
        # desc_act=False they are i // group_size; act-order is refused on unpacking).
        part = part - part.min()
    return part
