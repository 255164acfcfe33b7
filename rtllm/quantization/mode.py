"""``QuantAlgo`` (the algorithm names) and ``QuantMode`` (the same choice as bit flags).

Kept apart from :mod:`rtllm.quantization.config` (as in TensorRT-LLM) so that kernels
and layers can test flags without the config's validation and Hugging Face parsing.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rtllm.quantization.config import QuantConfig


class QuantAlgo(enum.StrEnum):
    """Quantization algorithms (values equal TensorRT-LLM's names)."""

    NO_QUANT = "NO_QUANT"
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    INT8 = "INT8"


class QuantMode(enum.IntFlag):
    """Bit flags derived from a :class:`QuantConfig`, tested by layers and kernels.

    ``PER_CHANNEL``: one weight scale per output channel; ``PER_GROUP``: one per group
    of input channels; ``PER_TOKEN``: activation scales computed per token at run time.
    """

    INT4_WEIGHTS = enum.auto()
    INT8_WEIGHTS = enum.auto()
    ACTIVATIONS = enum.auto()
    PER_CHANNEL = enum.auto()
    PER_TOKEN = enum.auto()
    PER_GROUP = enum.auto()
    INT8_KV_CACHE = enum.auto()
    FP8_KV_CACHE = enum.auto()
    FP8_QDQ = enum.auto()
    FP8_ROWWISE = enum.auto()

    @classmethod
    def from_quant_config(cls, config: QuantConfig | None) -> QuantMode:
        """The flags for ``config`` (``None``: no quantization, no flags)."""
        mode = cls(0)
        if config is None:
            return mode
        algo = config.quant_algo
        granularity = cls.PER_GROUP if config.weight_group_size != -1 else cls.PER_CHANNEL
        if algo == QuantAlgo.W8A16:
            mode |= cls.INT8_WEIGHTS | cls.PER_CHANNEL
        elif algo == QuantAlgo.W4A16:
            mode |= cls.INT4_WEIGHTS | cls.PER_CHANNEL
        elif algo in (QuantAlgo.W4A16_AWQ, QuantAlgo.W4A16_GPTQ):
            mode |= cls.INT4_WEIGHTS | granularity
        elif algo == QuantAlgo.W8A16_GPTQ:
            mode |= cls.INT8_WEIGHTS | granularity
        elif algo == QuantAlgo.W8A8_SQ_PER_CHANNEL:
            mode |= cls.INT8_WEIGHTS | cls.ACTIVATIONS | cls.PER_CHANNEL | cls.PER_TOKEN
        elif algo == QuantAlgo.FP8:
            mode |= cls.FP8_QDQ
            if config.activation_scheme == "dynamic":
                mode |= cls.PER_TOKEN
        elif algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN:
            mode |= cls.FP8_ROWWISE | cls.PER_CHANNEL | cls.PER_TOKEN
        if config.kv_cache_quant_algo == QuantAlgo.INT8:
            mode |= cls.INT8_KV_CACHE
        elif config.kv_cache_quant_algo == QuantAlgo.FP8:
            mode |= cls.FP8_KV_CACHE
        return mode

    def _has(self, flag: QuantMode) -> bool:
        return bool(self & flag)

    def is_int4_weight_only(self) -> bool:
        """int4 weights, float activations."""
        return self._has(QuantMode.INT4_WEIGHTS) and not self._has(QuantMode.ACTIVATIONS)

    def is_int8_weight_only(self) -> bool:
        """int8 weights, float activations."""
        return self._has(QuantMode.INT8_WEIGHTS) and not self._has(QuantMode.ACTIVATIONS)

    def is_weight_only(self) -> bool:
        """Integer weights with float activations (W8A16, W4A16 and their variants)."""
        return self.is_int4_weight_only() or self.is_int8_weight_only()

    def has_act_and_weight_quant(self) -> bool:
        """int8 weights and int8 activations (SmoothQuant)."""
        return self._has(QuantMode.INT8_WEIGHTS) and self._has(QuantMode.ACTIVATIONS)

    def has_fp8_qdq(self) -> bool:
        """FP8 weights with a per-tensor scale."""
        return self._has(QuantMode.FP8_QDQ)

    def has_fp8_rowwise(self) -> bool:
        """FP8 weights per output channel, activations per token."""
        return self._has(QuantMode.FP8_ROWWISE)

    def has_per_channel_scaling(self) -> bool:
        """One weight scale per output channel."""
        return self._has(QuantMode.PER_CHANNEL)

    def has_per_group_scaling(self) -> bool:
        """One weight scale per group of input channels."""
        return self._has(QuantMode.PER_GROUP)

    def has_per_token_dynamic_scaling(self) -> bool:
        """Activation scales computed per token at run time."""
        return self._has(QuantMode.PER_TOKEN)

    def has_int8_kv_cache(self) -> bool:
        """The KV cache stores int8."""
        return self._has(QuantMode.INT8_KV_CACHE)

    def has_fp8_kv_cache(self) -> bool:
        """The KV cache stores FP8 E4M3."""
        return self._has(QuantMode.FP8_KV_CACHE)

    def has_kv_cache_quant(self) -> bool:
        """The KV cache is quantized (int8 or FP8)."""
        return self.has_int8_kv_cache() or self.has_fp8_kv_cache()

    def has_weight_quant(self) -> bool:
        """Any weight quantization (integer or FP8)."""
        return self._has(
            QuantMode.INT4_WEIGHTS
            | QuantMode.INT8_WEIGHTS
            | QuantMode.FP8_QDQ
            | QuantMode.FP8_ROWWISE
        )
