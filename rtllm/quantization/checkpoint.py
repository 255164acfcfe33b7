"""Which quantization a model load uses: the checkpoint's own ``quantization_config``
(pre-quantized Hugging Face / rtllm directories) or the user's ``QuantConfig``."""

from __future__ import annotations

import json
import logging
import os

from rtllm.quantization.config import QuantConfig
from rtllm.quantization.mode import QuantAlgo

logger = logging.getLogger(__name__)


def checkpoint_quant_config(model_path: str) -> QuantConfig | None:
    """The ``quantization_config`` of a Hugging Face directory's ``config.json``, parsed
    with :meth:`QuantConfig.from_hf_quantization_config`; ``None`` when there is none
    (or ``model_path`` is a GGUF file)."""
    path = os.path.join(model_path, "config.json") if os.path.isdir(model_path) else model_path
    if os.path.basename(path) != "config.json" or not os.path.isfile(path):
        return None
    with open(path) as f:
        hf = json.load(f).get("quantization_config")
    return None if hf is None else QuantConfig.from_hf_quantization_config(hf)


def kv_cache_quant_supported(algo: QuantAlgo) -> bool:
    """True when the attention side can store the KV cache as ``algo``.

    The attention layers advertise it with a module attribute
    ``rtllm.layers.attention.KV_CACHE_QUANT_ALGOS`` (a collection of ``QuantAlgo``
    names); until that exists, KV-cache quantization is not supported.
    """
    from rtllm.layers import attention

    return str(algo) in {str(a) for a in getattr(attention, "KV_CACHE_QUANT_ALGOS", ())}


def resolve_quant_config(model_path: str, requested: QuantConfig | None) -> QuantConfig | None:
    """The quantization to load ``model_path`` with.

    A pre-quantized checkpoint's own config wins; ``requested`` may then be ``None``,
    equal to it, or ask only for a KV-cache type (``quant_algo`` None / NO_QUANT) that
    is added to it.

    Raises:
        ValueError: ``requested`` conflicts with the checkpoint's quantization.
        NotImplementedError: KV-cache quantization is asked for but not supported.
    """
    own = checkpoint_quant_config(model_path)
    config = requested
    if own is not None:
        if requested is None or requested == own:
            config = own
        elif requested.quant_algo in (None, QuantAlgo.NO_QUANT):
            fields = {f: getattr(own, f) for f in own.__dataclass_fields__}  # type: ignore[attr-defined]
            config = QuantConfig(**{**fields, "kv_cache_quant_algo": requested.kv_cache_quant_algo})
        else:
            raise ValueError(
                f"quant_config: {model_path} is already quantized ({own.quant_algo}); pass "
                "quant_config=None to load it as it is"
            )
        logger.info("pre-quantized checkpoint: %s", config.quant_algo)
    kv = None if config is None else config.kv_cache_quant_algo
    if kv is not None and not kv_cache_quant_supported(kv):
        raise NotImplementedError(
            f"KV-cache quantization ({kv}) is not supported by the attention layers yet; "
            "load with kv_cache_quant_algo=None"
        )
    if config is not None and config.quant_algo in (None, QuantAlgo.NO_QUANT):
        return None if config.kv_cache_quant_algo is None else config
    return config
