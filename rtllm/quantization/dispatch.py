"""Which kernel runs a quantized linear layer (the layers of
:mod:`rtllm.quantization.linear_method`): the dispatch point of every quantized forward.

* **Weight-only int4/int8** on CUDA: the kernels of :mod:`rtllm.kernels.quant_gemm`,
  on weights packed once into their layout (:func:`pack_weight_only_layers`, at build
  time); fused variants apply SiLU-mul in the decode GEMV's epilogue.
* **FP8** on GPUs with FP8 GEMMs: ``torch._scaled_mm`` (:mod:`rtllm.kernels.fp8_linear`),
  taking activations already quantized per token where :func:`takes_fp8_tokens`.
* Elsewhere, and for layouts the kernels do not take, the layer's PyTorch reference.
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.quantization.act_quant import Fp8Linear
from rtllm.quantization.rtn import Fp8Tokens
from rtllm.quantization.weight_only import WeightOnlyGroupwiseLinear, WeightOnlyInt8Linear


def takes_fp8_tokens(module: nn.Module) -> bool:
    """True when ``module`` may be given its input already quantized per token
    (:class:`Fp8Tokens`): FP8 with dynamic per-token activation scales, on a GPU with
    FP8 GEMMs (where the kernel before it then fuses the quantization)."""
    if not isinstance(module, Fp8Linear) or module.input_scale is not None:
        return False
    if getattr(module, "pre_quant_scale", None) is not None or not module.weight.is_cuda:
        return False
    from rtllm.kernels.fp8_linear import fp8_supported

    return fp8_supported(module.weight.device)


def quantized_linear_forward(module: nn.Module, x: torch.Tensor | Fp8Tokens) -> torch.Tensor:
    """Run quantized layer ``module`` on ``x`` ``[..., in]``, or on :class:`Fp8Tokens`
    ``[M, in]`` where :func:`takes_fp8_tokens` allows.

    On CUDA, weight-only int4/int8 layers run the Triton GEMMs of
    :mod:`rtllm.kernels.quant_gemm` (dequantizing inside the kernel) and FP8 layers
    ``torch._scaled_mm`` (:mod:`rtllm.kernels.fp8_linear`); elsewhere, and for the
    layouts the kernels do not take (GGUF float zero points, group sizes that are not
    a multiple of the kernel's block), the layer's PyTorch reference ``forward``.
    The first CUDA call packs the weights into the kernel layout and frees the codes.
    """
    if isinstance(x, Fp8Tokens):
        if not isinstance(module, Fp8Linear) or module.input_scale is not None:
            raise ValueError(f"{type(module).__name__} does not take activations quantized per token")
        from rtllm.kernels.fp8_linear import fp8_linear

        return fp8_linear(x, module.weight, _fp8_weight_scale(module, None), None, module.bias)
    if x.is_cuda:
        packed = _kernel_weight_only(module)
        if packed is not None:
            from rtllm.kernels.quant_gemm import quant_linear

            return quant_linear(_smoothed(module, x), packed, module.bias)
        if isinstance(module, Fp8Linear):
            from rtllm.kernels.fp8_linear import fp8_linear, fp8_supported

            if fp8_supported(x.device):
                input_scale = getattr(module, "input_scale", None)
                return fp8_linear(x, module.weight, _fp8_weight_scale(module, input_scale),
                                  input_scale, module.bias)
    return module(x)


def quantized_silu_and_mul_forward(module: nn.Module, x: torch.Tensor | Fp8Tokens) -> torch.Tensor | None:
    """``silu(gate) * up`` of weight-only layer ``module``'s output (a ``[gate; up]``
    projection) through :func:`rtllm.kernels.quant_gemm.quant_linear_silu_and_mul`,
    which applies the activation in the decode GEMV's epilogue; ``None`` where that
    path does not apply (not CUDA, not a weight-only layer the kernels take): the
    caller then runs the layer and the activation apart."""
    if isinstance(x, Fp8Tokens) or not x.is_cuda:
        return None
    packed = _kernel_weight_only(module)
    if packed is None:
        return None
    from rtllm.kernels.quant_gemm import quant_linear_silu_and_mul

    return quant_linear_silu_and_mul(_smoothed(module, x), packed, module.bias)


def pack_weight_only_layers(model: nn.Module) -> int:
    """Pack the codes of every weight-only layer on a GPU into the kernel layout now,
    freeing the codes, instead of on the layer's first call; returns how many layers
    were packed. The engine calls it before sizing the KV cache, so the memory plan
    counts the packed bytes (int4: half a byte per weight; the codes hold one)."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_cuda:
            count += _kernel_weight_only(module) is not None
    return count


def _kernel_weight_only(module: nn.Module) -> object | None:
    """The packed weights of a weight-only layer the Triton kernels take, else None."""
    if not isinstance(module, WeightOnlyInt8Linear | WeightOnlyGroupwiseLinear):
        return None
    return _packed_weight(module)


def _smoothed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` times the layer's AWQ / SmoothQuant pre-quantization scale, if it has one."""
    pre_quant_scale = getattr(module, "pre_quant_scale", None)
    return x if pre_quant_scale is None else x * pre_quant_scale.to(x.dtype)


def _fp8_weight_scale(module: nn.Module, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The weight scale as ``fp8_linear`` takes it without per-call copies: per channel
    ``[out]``; per tensor 0-dim with a static activation scale (tensorwise GEMM), else
    expanded once to ``[out]`` (the rowwise GEMM of per-token activations needs one
    scale per output channel) and kept on the module."""
    scale = module.weight_scale
    if scale.dim():
        return scale.reshape(-1)
    if input_scale is not None:
        return scale
    cached = getattr(module, "_rowwise_weight_scale", None)
    if cached is None or cached.device != scale.device:
        cached = scale.float().reshape(1).expand(module.out_features).contiguous()
        module._rowwise_weight_scale = cached
    return cached


def _packed_weight(module: nn.Module) -> object | None:
    """The kernel-layout weights of a weight-only layer, packed on first use (None when
    the kernels do not take its layout)."""
    packed = getattr(module, "_packed", None)
    if packed is not None or getattr(module, "_unpackable", False):
        return packed
    from rtllm.kernels.quant_gemm import prepack_int4, prepack_int8

    if isinstance(module, WeightOnlyInt8Linear):
        codes = (module.weight.to(torch.int16) + 128).to(torch.uint8)
        zeros = torch.full_like(module.weight_scale, 128, dtype=torch.int32)
        packed = prepack_int8(codes, zeros, module.weight_scale, -1)
    else:
        bits, group = module.bits, module.group_size
        block = 32 if bits == 4 else 16
        if module.weight_zero.is_floating_point() or (group != -1 and group % block):
            module._unpackable = True
            return None
        prepack = prepack_int4 if bits == 4 else prepack_int8
        packed = prepack(module.weight, module.weight_zero, module.weight_scale, group)
    module._packed = packed
    # The codes are not needed any more on this device: keep only the packed copy.
    module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
    return packed
