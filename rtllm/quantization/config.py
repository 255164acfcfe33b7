"""Quantization configuration with TensorRT-LLM's names.

``QuantConfig`` says *what* a checkpoint or a user asks for; ``QuantMode`` (in
:mod:`rtllm.quantization.mode`, with ``QuantAlgo``) is the same information as bit flags
that layers and kernels test cheaply. Meaning of each algorithm
in rtllm (weights / activations):

============================  =====================================================
``W8A16``                     int8 weights, one scale per output channel; float acts
``W4A16``                     int4 weights, one scale per output channel (TRT-LLM's
                              meaning: ``group_size`` is ignored); float acts
``W4A16_AWQ``                 int4 weights, groupwise along the input dim, optional
                              zero point and per-input-channel ``pre_quant_scale``
``W4A16_GPTQ``                int4 weights, groupwise (``group_size=-1``: per channel)
``W8A16_GPTQ``                int8 weights, groupwise (``group_size=-1``: per channel)
``W8A8_SQ_PER_CHANNEL``       SmoothQuant: int8 weights per output channel, int8
                              activations with a dynamic per-token scale (TRT-LLM's
                              ``..._PER_TOKEN`` variant; rtllm has no static int8 scale)
``FP8``                       FP8 E4M3 weights with one per-tensor scale; FP8
                              activations, per-tensor static (``activation_scheme=
                              "static"``, checkpoint ``input_scale``) or per-token dynamic
``FP8_PER_CHANNEL_PER_TOKEN`` FP8 weights per output channel, dynamic per-token acts
``INT8`` / ``FP8``            as ``kv_cache_quant_algo``: the KV cache's element type
============================  =====================================================
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rtllm.quantization.mode import QuantAlgo, QuantMode

#: Algorithms allowed as ``QuantConfig.quant_algo`` (INT8 names only a KV-cache type).
WEIGHT_QUANT_ALGOS = frozenset(QuantAlgo) - {QuantAlgo.INT8}
#: Algorithms allowed as ``QuantConfig.kv_cache_quant_algo`` (besides ``None``).
KV_CACHE_QUANT_ALGOS = frozenset({QuantAlgo.INT8, QuantAlgo.FP8})
#: Groupwise algorithms and the group sizes their kernels support (-1: per channel).
GROUP_SIZES: dict[QuantAlgo, frozenset[int]] = {
    QuantAlgo.W4A16_AWQ: frozenset({64, 128}),
    QuantAlgo.W4A16_GPTQ: frozenset({-1, 32, 64, 128}),
    QuantAlgo.W8A16_GPTQ: frozenset({-1, 32, 64, 128}),
}
_ZERO_POINT_ALGOS = frozenset(GROUP_SIZES)
_PRE_QUANT_SCALE_ALGOS = frozenset({QuantAlgo.W4A16_AWQ, QuantAlgo.W8A8_SQ_PER_CHANNEL})
_FP8_ALGOS = frozenset({QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN})
ACTIVATION_SCHEMES = ("dynamic", "static")
#: Values of ``QuantConfig.fp8_weight_rounding``.
FP8_WEIGHT_ROUNDINGS = ("gptq", "nearest")


def _allowed(values: Iterable[object]) -> str:
    return ", ".join(sorted(str(v) for v in values))


def _coerce_algo(field: str, value: object, allowed: frozenset[QuantAlgo]) -> QuantAlgo | None:
    if value is None:
        return None
    try:
        algo = QuantAlgo(str(value).upper())
    except ValueError:
        algo = None
    if algo is None or algo not in allowed:
        raise ValueError(f"{field} must be None or one of {{{_allowed(allowed)}}}, got {value!r}")
    return algo


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """What to quantize and how; frozen and validated on construction.

    Invalid combinations raise ``ValueError`` naming the field and its allowed values.
    Whether ``group_size`` divides a layer's input size can only be known per layer:
    :meth:`check_in_features` does it when a quantized layer is built.
    """

    #: Weight (and activation) algorithm; ``None`` or ``NO_QUANT``: no quantization.
    quant_algo: QuantAlgo | None = None
    #: KV-cache element type: ``None`` (model dtype), ``INT8`` or ``FP8``.
    kv_cache_quant_algo: QuantAlgo | None = None
    #: Input channels sharing one scale (and zero) in groupwise algos; -1 means one group
    #: spanning the whole input (per channel). Ignored by the non-groupwise algos.
    group_size: int = 128
    #: Groupwise weights store an integer zero point: ``w = (q - zero) * scale``.
    has_zero_point: bool = False
    #: The layer multiplies its input by a per-input-channel vector before quantizing
    #: it (AWQ's and SmoothQuant's smoothing scale, when not folded into the previous op).
    pre_quant_scale: bool = False
    #: Module-name patterns (fnmatch) left in float; see :func:`is_module_excluded`.
    exclude_modules: tuple[str, ...] | None = None
    #: SmoothQuant's migration strength alpha in ``s = amax_x^alpha / amax_w^(1-alpha)``.
    smoothquant_val: float = 0.5
    #: Number of calibration samples (algorithms that calibrate).
    calib_size: int = 512
    #: Longest calibration sample in tokens.
    calib_max_seq_length: int = 512
    #: Calibration data set name or path; ``None``: the calibrator's default.
    calib_dataset: str | None = None
    #: FP8 activation scales: ``"dynamic"`` (per token, at run time) or ``"static"``
    #: (one per-tensor ``input_scale`` from the checkpoint). FP8 algorithms only.
    activation_scheme: str = "dynamic"
    #: GGUF files only: keep Q8_0 / Q4_0 / Q4_1 linear weights as groupwise int8 / int4
    #: (group 32, the GGUF block) instead of dequantizing them; float linear weights of
    #: the file are quantized with ``quant_algo`` (W4A16_GPTQ or W8A16_GPTQ, group 32).
    #: Made by :meth:`from_gguf`.
    keep_gguf_quantized: bool = False
    #: How FP8 weights (``FP8``, ``FP8_PER_CHANNEL_PER_TOKEN``) of a float checkpoint
    #: are rounded to their E4M3 grid, whose scales are round-to-nearest's either way
    #: (``amax / 448`` per tensor / per output channel): ``"gptq"`` (default) calibrates
    #: decoder layer by decoder layer on ``calib_size`` x ``calib_max_seq_length``
    #: tokens and rounds each linear with GPTQ's error feedback on its inputs' Hessian
    #: (:mod:`rtllm.quantization.gptq_fp8`; SmolLM2-135M: see README.md);
    #: ``"nearest"``: plain round-to-nearest, no calibration (unless
    #: ``activation_scheme="static"`` needs it). A non-default value needs an FP8
    #: ``quant_algo``. A calibration-time option: checkpoints do not record it (their
    #: weights are FP8 already).
    fp8_weight_rounding: str = "gptq"

    def __post_init__(self) -> None:
        # Normalising field values of a frozen dataclass needs object.__setattr__.
        algo = _coerce_algo("quant_algo", self.quant_algo, WEIGHT_QUANT_ALGOS)
        object.__setattr__(self, "quant_algo", algo)
        kv = _coerce_algo("kv_cache_quant_algo", self.kv_cache_quant_algo, KV_CACHE_QUANT_ALGOS)
        object.__setattr__(self, "kv_cache_quant_algo", kv)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"group_size must be an int, got {self.group_size!r}")
        if algo in GROUP_SIZES:
            if self.group_size not in GROUP_SIZES[algo]:
                raise ValueError(
                    f"group_size for {algo} must be one of {{{_allowed(GROUP_SIZES[algo])}}}, "
                    f"got {self.group_size}"
                )
        elif self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")
        if self.has_zero_point and algo not in _ZERO_POINT_ALGOS:
            raise ValueError(
                f"has_zero_point=True needs quant_algo in {{{_allowed(_ZERO_POINT_ALGOS)}}}, "
                f"got {algo}"
            )
        if self.pre_quant_scale and algo not in _PRE_QUANT_SCALE_ALGOS:
            raise ValueError(
                "pre_quant_scale=True needs quant_algo in "
                f"{{{_allowed(_PRE_QUANT_SCALE_ALGOS)}}}, got {algo}"
            )
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"activation_scheme must be one of {ACTIVATION_SCHEMES}, "
                f"got {self.activation_scheme!r}"
            )
        if self.activation_scheme == "static" and algo != QuantAlgo.FP8:
            raise ValueError(
                f"activation_scheme='static' needs quant_algo FP8 (per-tensor), got {algo}"
            )
        if self.fp8_weight_rounding not in FP8_WEIGHT_ROUNDINGS:
            raise ValueError(
                f"fp8_weight_rounding must be one of {FP8_WEIGHT_ROUNDINGS}, "
                f"got {self.fp8_weight_rounding!r}"
            )
        if self.fp8_weight_rounding != FP8_WEIGHT_ROUNDINGS[0] and algo not in _FP8_ALGOS:
            raise ValueError(
                f"fp8_weight_rounding={self.fp8_weight_rounding!r} needs quant_algo in "
                f"{{{_allowed(_FP8_ALGOS)}}}, got {algo}"
            )
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str) or not all(
                isinstance(p, str) for p in self.exclude_modules
            ):
                raise ValueError(
                    f"exclude_modules must be None or a sequence of str patterns, "
                    f"got {self.exclude_modules!r}"
                )
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        if not 0.0 <= self.smoothquant_val <= 1.0:
            raise ValueError(f"smoothquant_val must be in [0, 1], got {self.smoothquant_val}")
        if self.keep_gguf_quantized and (
            algo not in (QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ) or self.group_size != 32
        ):
            raise ValueError(
                "keep_gguf_quantized=True needs quant_algo W4A16_GPTQ or W8A16_GPTQ with "
                f"group_size 32 (the GGUF block), got {algo} group_size {self.group_size}"
            )
        for name in ("calib_size", "calib_max_seq_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_gguf(cls, bits: int = 4) -> QuantConfig:
        """Keep a GGUF file's quantized linear weights quantized (no dequantization).

        Q4_0 / Q4_1 tensors become int4 and Q8_0 tensors int8 groupwise weights with
        group 32 (Q4_1's float minimum is held as a float zero point); linear weights
        the file stores as F32/F16/BF16 are quantized on load to ``bits`` (4 or 8)
        with group 32 and a zero point. Embeddings and ``lm_head`` stay float (a Q8_0
        embedding dequantizes exactly). Only valid for ``.gguf`` models.
        """
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        algo = QuantAlgo.W4A16_GPTQ if bits == 4 else QuantAlgo.W8A16_GPTQ
        return cls(quant_algo=algo, group_size=32, has_zero_point=True, keep_gguf_quantized=True)

    @property
    def quant_mode(self) -> QuantMode:
        """The flags of this config (:meth:`QuantMode.from_quant_config`)."""
        return QuantMode.from_quant_config(self)

    @property
    def gptq_fp8_rounding(self) -> bool:
        """FP8 weights rounded with GPTQ (``fp8_weight_rounding="gptq"``): calibration
        layer by layer."""
        return self.quant_algo in _FP8_ALGOS and self.fp8_weight_rounding == "gptq"

    @property
    def weight_group_size(self) -> int:
        """Input channels per weight scale for this algo: ``-1`` means per channel."""
        return self.group_size if self.quant_algo in GROUP_SIZES else -1

    def check_in_features(self, in_features: int, module_name: str = "<linear>") -> None:
        """Raise ``ValueError`` unless ``weight_group_size`` divides ``in_features``."""
        group = self.weight_group_size
        if group != -1 and in_features % group != 0:
            raise ValueError(
                f"{module_name}: group_size {group} of {self.quant_algo} does not divide "
                f"in_features {in_features}"
            )

    def is_excluded(self, module_name: str) -> bool:
        """True when ``module_name`` stays unquantized (see :func:`is_module_excluded`)."""
        return is_module_excluded(module_name, self.exclude_modules)

    @classmethod
    def from_hf_quantization_config(cls, hf: Mapping[str, Any]) -> QuantConfig:
        """Parse the ``quantization_config`` dict of a Hugging Face ``config.json``.

        Supported ``quant_method``\\ s: ``awq`` (``version`` gemm, 4 bits), ``gptq``
        (4 or 8 bits, ``desc_act`` False, ``checkpoint_format`` gptq) and ``fp8``
        (per-tensor weights, ``activation_scheme`` static or dynamic).
        ``modules_to_not_convert`` becomes ``exclude_modules``.

        Raises:
            ValueError: malformed values (missing ``quant_method``, bad bits).
            NotImplementedError: valid checkpoints rtllm cannot run (act-order GPTQ,
                AWQ GEMV kernels layout, block-wise FP8, other methods).
        """
        method = str(hf.get("quant_method", "")).lower()
        if method == "rtllm":
            return cls._from_rtllm_dict(hf)
        config = cls._from_hf_method(method, hf)
        kv = hf.get("kv_cache_quant_algo")
        if kv is not None:
            config = cls(**{**config._fields(), "kv_cache_quant_algo": kv})
        return config

    def _fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}  # type: ignore[attr-defined]

    @classmethod
    def _from_rtllm_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        known = set(cls.__dataclass_fields__) - {"keep_gguf_quantized"}  # type: ignore[attr-defined]
        unknown = set(d) - known - {"quant_method"}
        if unknown:
            raise ValueError(
                f"rtllm quantization_config has unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(known)}"
            )
        kwargs = {k: v for k, v in d.items() if k != "quant_method"}
        if kwargs.get("exclude_modules") is not None:
            kwargs["exclude_modules"] = tuple(kwargs["exclude_modules"])
        return cls(**kwargs)

    @classmethod
    def _from_hf_method(cls, method: str, hf: Mapping[str, Any]) -> QuantConfig:
        excluded = hf.get("modules_to_not_convert")
        excluded = tuple(excluded) if excluded is not None else None
        if method == "awq":
            version = str(hf.get("version", "gemm")).lower()
            if version != "gemm":
                raise NotImplementedError(
                    f"AWQ version {version!r} is not supported (only 'gemm' packing)"
                )
            bits = hf.get("bits", hf.get("w_bit", 4))
            if bits != 4:
                raise ValueError(f"AWQ bits must be 4, got {bits!r}")
            return cls(
                quant_algo=QuantAlgo.W4A16_AWQ,
                group_size=int(hf.get("group_size", hf.get("q_group_size", 128))),
                has_zero_point=bool(hf.get("zero_point", True)),
                exclude_modules=excluded,
            )
        if method == "gptq":
            bits = hf.get("bits")
            if bits not in (4, 8):
                raise ValueError(f"GPTQ bits must be 4 or 8, got {bits!r}")
            if hf.get("desc_act", False):
                raise NotImplementedError(
                    "GPTQ with desc_act=True (act-order, permuted g_idx) is not supported; "
                    "re-quantize with desc_act=False"
                )
            fmt = hf.get("checkpoint_format", "gptq")
            if fmt != "gptq":
                raise NotImplementedError(
                    f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq', v1 zeros)"
                )
            return cls(
                quant_algo=QuantAlgo.W4A16_GPTQ if bits == 4 else QuantAlgo.W8A16_GPTQ,
                group_size=int(hf.get("group_size", 128)),
                has_zero_point=not bool(hf.get("sym", True)),
                exclude_modules=excluded,
            )
        if method == "fp8":
            if hf.get("weight_block_size") is not None:
                raise NotImplementedError(
                    "block-wise FP8 (weight_block_size) is not supported; only per-tensor"
                )
            return cls(
                quant_algo=QuantAlgo.FP8,
                activation_scheme=str(hf.get("activation_scheme", "dynamic")),
                exclude_modules=excluded,
            )
        if not method:
            raise ValueError("quantization_config has no 'quant_method'")
        raise NotImplementedError(
            f"quant_method {method!r} is not supported (supported: awq, fp8, gptq)"
        )

    def to_checkpoint_quantization_config(self) -> dict[str, Any]:
        """The ``quantization_config`` that ``rtllm quantize`` writes.

        The Hugging Face form (:meth:`to_hf_quantization_config`) where one exists, with
        ``kv_cache_quant_algo`` added when set (other tools ignore the extra key);
        otherwise rtllm's own form ``{"quant_method": "rtllm", <QuantConfig fields>}``
        (e.g. ``W8A8_SQ_PER_CHANNEL``). :meth:`from_hf_quantization_config` reads both.
        How the weights were calibrated and rounded (``calib_*``,
        ``fp8_weight_rounding``) is not written: they are quantized already, and a
        loader reading the config back gets the defaults and never calibrates them.
        """
        if self.keep_gguf_quantized:
            raise ValueError("keep_gguf_quantized configs describe a GGUF file, not a checkpoint")
        plain = QuantConfig(**{**self._fields(), "kv_cache_quant_algo": None})
        try:
            out = plain.to_hf_quantization_config()
        except ValueError:
            out = {"quant_method": "rtllm"}
            for name, value in self._fields().items():
                if name in (
                    "keep_gguf_quantized", "kv_cache_quant_algo", "fp8_weight_rounding"
                ) or name.startswith("calib"):
                    continue
                out[name] = list(value) if isinstance(value, tuple) else value
            out["quant_algo"] = str(self.quant_algo)
        if self.kv_cache_quant_algo is not None:
            out["kv_cache_quant_algo"] = str(self.kv_cache_quant_algo)
        return out

    def to_hf_quantization_config(self) -> dict[str, Any]:
        """The Hugging Face ``quantization_config`` dict that
        :meth:`from_hf_quantization_config` reads back into an equal config.

        Raises:
            ValueError: when this config has no Hugging Face form (other algorithms, a
                KV-cache algorithm or ``pre_quant_scale``).
        """
        if self.kv_cache_quant_algo is not None or self.pre_quant_scale or self.keep_gguf_quantized:
            raise ValueError(
                "kv_cache_quant_algo, pre_quant_scale and keep_gguf_quantized have no Hugging Face "
                "quantization_config form"
            )
        algo = self.quant_algo
        out: dict[str, Any]
        if algo == QuantAlgo.W4A16_AWQ:
            out = {
                "quant_method": "awq",
                "version": "gemm",
                "bits": 4,
                "group_size": self.group_size,
                "zero_point": self.has_zero_point,
            }
        elif algo in (QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ):
            out = {
                "quant_method": "gptq",
                "bits": 4 if algo == QuantAlgo.W4A16_GPTQ else 8,
                "group_size": self.group_size,
                "desc_act": False,
                "sym": not self.has_zero_point,
            }
        elif algo == QuantAlgo.FP8:
            out = {"quant_method": "fp8", "activation_scheme": self.activation_scheme}
        else:
            raise ValueError(
                f"quant_algo {algo} has no Hugging Face quantization_config form "
                "(supported: W4A16_AWQ, W4A16_GPTQ, W8A16_GPTQ, FP8)"
            )
        if self.exclude_modules is not None:
            out["modules_to_not_convert"] = list(self.exclude_modules)
        return out


def is_module_excluded(name: str, exclude_modules: Iterable[str] | None) -> bool:
    """True when a pattern of ``exclude_modules`` matches module ``name``.

    A pattern (``fnmatch``, case-sensitive; ``*`` also crosses dots) matches when it
    matches the full dotted name or any run of consecutive dotted components of it, so
    ``"lm_head"`` matches ``"lm_head"``, ``"mlp.down_proj"`` matches
    ``"model.layers.3.mlp.down_proj"`` and ``"model.layers.1"`` matches
    ``"model.layers.1.self_attn.o_proj"`` but not ``"model.layers.10.self_attn.o_proj"``.
    Fused modules (``qkv_proj``) should be checked under each checkpoint name they fuse.
    """
    if not exclude_modules:
        return False
    parts = name.split(".")
    runs = [".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(run, pattern) for pattern in exclude_modules for run in runs)
