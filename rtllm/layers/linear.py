"""Linear layers whose parameters know how checkpoint tensors load into them.

Each parameter carries a ``weight_loader(param, tensor, shard_id)``: fused layers
(q/k/v, gate/up) declare where each checkpoint shard goes, so the model loader
fuses them without knowing any model.

Quantized layers (a ``quant_config`` that applies to the layer's checkpoint names)
hold no float weight. Their life cycle, driven by :mod:`rtllm.models.loader`:

1. *staging*: :meth:`Linear.load_checkpoint_tensor` keeps each shard's checkpoint
   tensors (float, AWQ, GPTQ, FP8 or rtllm's integer layout);
2. *process weights after loading*: once every shard is there (float weights are
   quantized as soon as their last shard arrives, so a float model never exists in
   full), :meth:`Linear.process_weights_after_loading` builds the quantized module
   ``self.quant`` (see :mod:`rtllm.quantization.linear_method`);
3. float weights of algorithms that calibrate (AWQ, SmoothQuant, static FP8) are
   instead assembled into a float ``weight`` that calibration smooths in place;
   :meth:`Linear.quantize_float_weight` then quantizes it.

``load_format="dummy"`` calls :meth:`Linear.init_dummy`, which allocates the quantized
parameters directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtllm.quantization import dispatch, linear_method
from rtllm.quantization.config import QuantConfig
from rtllm.quantization.rtn import Fp8Tokens


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy ``loaded`` into ``param`` after checking the shape."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def fused_checkpoint_names(prefix: str, shard_names: list[str] | None) -> list[str]:
    """Checkpoint module names of a fused layer's shards: siblings of ``prefix``'s last
    part (``[prefix]`` when the layer is not fused)."""
    if shard_names is None:
        return [prefix]
    parent = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
    return [parent + name for name in shard_names]


class Linear(nn.Module):
    """``y = x W^T + b`` with Hugging Face's ``weight``/``bias`` names.

    ``prefix`` is the module's name in the model (``model.layers.0.mlp.down_proj``);
    with ``quant_config`` the layer is quantized unless ``exclude_modules`` names it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quant_config: QuantConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.prefix = prefix
        self.has_bias = bias
        self.quant_config = linear_method.layer_quant_config(quant_config, self.checkpoint_names())
        self.quant: nn.Module | None = None
        if self.quant_config is not None:
            quant_config.check_in_features(in_features, prefix)
            # The device and dtype the model is being built with (build_model's context).
            probe = torch.empty(0)
            self._device, self._dtype = probe.device, probe.dtype
            self._staged: dict[object, dict[str, torch.Tensor]] = {}
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            return
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    # --- shards ---------------------------------------------------------------------
    def shard_ids(self) -> list[object]:
        """Checkpoint shards fused into this layer (``[None]``: not fused)."""
        return [None]

    def checkpoint_names(self) -> list[str]:
        """Checkpoint module names of the shards (for ``exclude_modules``)."""
        return [self.prefix]

    def shard_rows(self, shard_id: object) -> tuple[int, int]:
        """``(start, size)`` of a shard's rows in the fused weight."""
        return 0, self.out_features

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded)

    # --- quantization hooks -----------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        """True when this layer is (or will be, once loaded) quantized."""
        return self.quant_config is not None

    @property
    def awaiting_calibration(self) -> bool:
        """A float weight is loaded and waits for calibration before quantization."""
        return self.quant_config is not None and self.quant is None and self.weight is not None

    def load_checkpoint_tensor(self, suffix: str, tensor: torch.Tensor, shard_id: object) -> None:
        """Stage checkpoint tensor ``<shard>.<suffix>`` (``weight``, ``qweight``, ...)."""
        if shard_id not in self.shard_ids():
            raise ValueError(f"{self.prefix}: unknown shard {shard_id!r}; expected {self.shard_ids()}")
        if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and suffix in ("weight", "bias"):
            tensor = tensor.to(self._dtype)
        self._staged.setdefault(shard_id, {})[suffix] = tensor.to(self._device)
        if self._float_ready() and not linear_method.needs_calibration(self.quant_config):
            self.process_weights_after_loading()  # frees the float shards right away

    def _float_ready(self) -> bool:
        wanted = ("weight", "bias") if self.has_bias else ("weight",)
        for shard in self.shard_ids():
            staged = self._staged.get(shard, {})
            if not all(k in staged for k in wanted) or staged["weight"].dtype.itemsize == 1:
                return False
        return True

    def process_weights_after_loading(self) -> None:
        """Build the quantized module from the staged tensors (no-op when done).

        Float weights of calibrating algorithms become a float ``weight`` parameter
        (``awaiting_calibration``) instead.
        """
        if self.quant_config is None or self.quant is not None or self.weight is not None:
            return
        if self._float_ready() and linear_method.needs_calibration(self.quant_config):
            shards = [self._staged[s] for s in self.shard_ids()]
            self.weight = nn.Parameter(torch.cat([t["weight"] for t in shards]), requires_grad=False)
            if self.has_bias:
                self.bias = nn.Parameter(torch.cat([t["bias"] for t in shards]), requires_grad=False)
        else:
            with torch.device(self._device):
                self.quant = linear_method.build_from_staged(
                    self.quant_config, self._staged, self.shard_ids(), self._dtype, self.prefix
                )
        self._staged = {}

    def quantize_float_weight(
        self, pre_quant_scale: torch.Tensor | None = None, input_amax: float | None = None
    ) -> None:
        """Quantize the (calibrated, smoothed) float weight and drop it."""
        if not self.awaiting_calibration:
            raise RuntimeError(f"{self.prefix}: no float weight awaits quantization")
        with torch.device(self._device):
            self.quant = linear_method.quantize_float(
                self.quant_config, self.weight.data, None if self.bias is None else self.bias.data,
                pre_quant_scale, input_amax,
            )
        self.weight = None
        self.bias = None

    def init_dummy(self, generator: torch.Generator) -> None:
        """Allocate the quantized parameters and fill them with random codes."""
        pre_quant_scale = linear_method.holds_pre_quant_scale(self.quant_config, self.prefix)
        with torch.device(self._device):
            self.quant = linear_method.empty_quantized_linear(
                self.quant_config, self.in_features, self.out_features, self.has_bias,
                self._dtype, pre_quant_scale,
            )
        linear_method.fill_dummy_(self.quant, generator)

    @property
    def fp8_token_input(self) -> bool:
        """True when the input may come quantized per token (``Fp8Tokens``, see
        ``dispatch.takes_fp8_tokens``): the kernel that produces it (RMSNorm,
        SiLU-mul) then fuses the quantization."""
        quant = self.quant
        if quant is None:
            return False
        cached = getattr(self, "_fp8_token_input", None)
        if cached is None or cached[0] is not quant:  # decided once per quantized module
            cached = (quant, dispatch.takes_fp8_tokens(quant))
            self._fp8_token_input = cached
        return cached[1]

    def silu_and_mul_forward(self, x: torch.Tensor | Fp8Tokens) -> torch.Tensor | None:
        """``silu(gate) * up`` of this ``[gate; up]`` projection's output where a quantized
        kernel fuses the activation (weight-only layers on CUDA:
        ``dispatch.quantized_silu_and_mul_forward``), else ``None``."""
        if self.quant is None:
            return None
        return dispatch.quantized_silu_and_mul_forward(self.quant, x)

    def forward(self, x: torch.Tensor | Fp8Tokens) -> torch.Tensor:
        if self.quant is not None:
            return dispatch.quantized_linear_forward(self.quant, x)
        if self.weight is None:
            raise RuntimeError(f"{self.prefix}: quantized layer used before its weights were loaded")
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several linear layers sharing an input, fused along the output dimension.

    ``output_sizes[i]`` rows of the fused weight belong to shard ``shard_ids[i]``,
    whose checkpoint module is ``shard_names[i]`` (a sibling of ``prefix``'s last part).
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        shard_ids: list[object],
        bias: bool = False,
        quant_config: QuantConfig | None = None,
        prefix: str = "",
        shard_names: list[str] | None = None,
    ) -> None:
        if len(output_sizes) != len(shard_ids):
            raise ValueError("output_sizes and shard_ids must have the same length")
        if shard_names is not None and len(shard_names) != len(shard_ids):
            raise ValueError("shard_names and shard_ids must have the same length")
        self._offsets: dict[object, tuple[int, int]] = {}
        start = 0
        for shard_id, size in zip(shard_ids, output_sizes, strict=True):
            self._offsets[shard_id] = (start, size)
            start += size
        self._shard_names = shard_names
        super().__init__(in_features, sum(output_sizes), bias, quant_config, prefix)

    def shard_ids(self) -> list[object]:
        return list(self._offsets)

    def checkpoint_names(self) -> list[str]:
        return fused_checkpoint_names(self.prefix, self._shard_names)

    def shard_rows(self, shard_id: object) -> tuple[int, int]:
        return self._offsets[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id not in self._offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self._offsets)}")
        start, size = self._offsets[shard_id]
        default_weight_loader(param.data.narrow(0, start, size), loaded)


class QKVLinear(MergedLinear):
    """The fused q/k/v projection of grouped-query attention (shards "q", "k", "v")."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        quant_config: QuantConfig | None = None,
        prefix: str = "",
    ) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(
            hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            ["q", "k", "v"],
            bias,
            quant_config,
            prefix,
            ["q_proj", "k_proj", "v_proj"],
        )
