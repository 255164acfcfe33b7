"""Read GGUF checkpoints (llama.cpp format) as Hugging Face configs and state dicts.

Two public entry points:

* :func:`read_gguf_config` builds a ``config.json``-style dict from the GGUF metadata.
* :func:`iter_gguf_weights` yields ``(hf_name, float32 tensor)`` pairs in HF layout.

Why not ``gguf.GGUFReader``: it materialises every metadata array element (the
tokenizer's ~100k strings) as its own numpy array, which takes ~3 s for SmolLM2 before
a single weight is read.  The GGUF container is simple, so this module parses the
header itself (only the array *lengths* of string arrays are walked) and memory-maps
the tensor data.  Dequantisation is vectorised torch code (see :func:`dequantize`),
measured ~5x faster than ``gguf.quants.dequantize`` (numpy) on 2 cores and checked
against it bit-for-bit in the tests.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from rtllm.quantization.gguf import KEPT_TYPES, gguf_to_groupwise

logger = logging.getLogger(__name__)

# GGUF architecture -> (HF architectures entry, HF model_type, q/k rows permuted?).
# llama.cpp's convert script permutes the q/k projection rows of llama-family models
# (rotary pairs interleaved instead of split in halves); qwen2/qwen3 are stored as-is.
_ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Present in some files but not HF parameters (rope_freqs is folded into rope_scaling).
_NON_PARAMETER_TENSORS = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# GGUF metadata value type ids: numeric ones map to (little-endian) numpy dtypes.
_STRING, _ARRAY = 8, 9
_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
             10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class StringArray:
    """Placeholder for a metadata array of strings: only its length is read."""

    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Location of one tensor in the file. ``shape`` is in HF (row-major) order."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    """Parsed GGUF header plus a copy-on-write memory map of the whole file."""

    path: str
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    buffer: mmap.mmap = field(repr=False)

    def raw(self, info: GGUFTensorInfo) -> torch.Tensor:
        """Return the tensor's bytes as a zero-copy uint8 torch view of the mapping."""
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=info.nbytes,
                                offset=info.offset)


def open_gguf(path: str) -> GGUFFile:
    """Parse the header of the GGUF file at ``path`` and memory-map its data.

    The mapping is ``ACCESS_COPY`` (private copy-on-write): torch needs a writable
    buffer to wrap without warnings, and writes (which we never do) cannot reach the file.
    """
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (byte order or format)")
    pos = 24

    def read_str(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        return buf[p + 8:p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

    def read_value(vtype: int, p: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return read_str(p)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if etype == _STRING:  # walk the lengths only; decoding 100k strings is slow
                for _ in range(count):
                    p += 8 + struct.unpack_from("<Q", buf, p)[0]
                return StringArray(count), p
            if etype in _NP_DTYPE:
                arr = np.frombuffer(buf, dtype=_NP_DTYPE[etype], count=count, offset=p)
                return arr.copy(), p + arr.nbytes
            items = []
            for _ in range(count):
                item, p = read_value(etype, p)
                items.append(item)
            return items, p
        if vtype not in _NP_DTYPE:
            raise ValueError(f"{path}: unknown GGUF metadata value type {vtype}")
        value = np.frombuffer(buf, dtype=_NP_DTYPE[vtype], count=1, offset=p)[0]
        return value.item(), p + value.itemsize

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = read_str(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = read_value(vtype, pos + 4)

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name, pos = read_str(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, rel = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        # GGUF lists dims innermost-first (ne0 = row length); HF shapes are the reverse.
        infos.append((name, tuple(int(d) for d in reversed(dims)), qtype, rel))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment

    tensors = []
    for name, shape, qtype, rel in infos:
        n_elem = math.prod(shape)
        block, type_size = GGML_QUANT_SIZES.get(qtype, (1, 0))  # unknown type: rejected on read
        tensors.append(GGUFTensorInfo(name, shape, qtype, data_start + rel,
                                      n_elem // block * type_size))
    return GGUFFile(path, metadata, tensors, buf)


def _dequant_blocks(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """Dequantise ``(n_blocks, type_size)`` uint8 blocks into ``(n_blocks, 32)`` float32.

    The arithmetic mirrors ``gguf.quants`` exactly (float32 ``d * q (+ m)``) so results
    are bit-identical. Output is written in place into one buffer: fewer full passes.
    """
    n = blocks.shape[0]
    out = torch.empty((n, 32), dtype=torch.float32)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    if qtype == GGMLQuantizationType.Q8_0:
        out.copy_(blocks[:, 2:].view(torch.int8))
        return out.mul_(d)
    # 4-bit: byte j holds element j in its low nibble and element j + 16 in its high one.
    qs = blocks[:, 4:] if qtype == GGMLQuantizationType.Q4_1 else blocks[:, 2:]
    out[:, :16].copy_(qs & 0x0F)
    out[:, 16:].copy_(qs >> 4)
    if qtype == GGMLQuantizationType.Q4_0:
        return out.sub_(8.0).mul_(d)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return out.mul_(d).add_(m)


def dequantize(data: np.ndarray | torch.Tensor, qtype: int, name: str = "<tensor>") -> torch.Tensor:
    """Dequantise raw GGUF tensor data to float32, like ``gguf.quants.dequantize``.

    Args:
        data: bytes as uint8 whose last dim is a whole number of blocks, or (for
            F32/F16/BF16) an array already of that element type.
        qtype: a :class:`gguf.GGMLQuantizationType` value.
        name: tensor name used in error messages.

    Returns:
        float32 tensor of shape ``(*data.shape[:-1], elements_per_row)`` that does not
        alias ``data``.

    Raises:
        NotImplementedError: for quantisation types other than F32/F16/BF16/Q8_0/Q4_0/Q4_1.
    """
    t = data
    if isinstance(data, np.ndarray):
        with warnings.catch_warnings():  # read-only memmaps (GGUFReader) are only read here
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(data)
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise NotImplementedError(f"GGUF tensor '{name}' has unknown type id {qtype}") from None
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        dtype = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                 GGMLQuantizationType.BF16: torch.bfloat16}[qtype]
        if t.dtype == torch.uint8:
            t = t.view(dtype)  # reinterpret the bytes along the last dim
        return t.to(torch.float32, copy=True)
    if qtype not in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0,
                     GGMLQuantizationType.Q4_1):
        raise NotImplementedError(
            f"GGUF tensor '{name}' uses quantisation type {qtype.name}, which rtllm cannot "
            "dequantise (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
        )
    block, type_size = GGML_QUANT_SIZES[qtype]
    lead = tuple(t.shape[:-1])
    out = _dequant_blocks(t.reshape(-1, type_size), qtype)
    return out.reshape(*lead, t.shape[-1] // type_size * block)


def _float(value: Any) -> float:
    # GGUF stores these as float32: 1e-5 arrives as 9.99999974e-06. The shortest decimal
    # that round-trips the float32 is the value the converter was given.
    return float(str(np.float32(value)))


def _detect_llama3_rope(freqs: torch.Tensor, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover HF ``rope_scaling`` (llama3) from llama.cpp's ``rope_freqs`` factors.

    llama.cpp stores per-frequency divisors r: 1 for short wavelengths, ``factor`` for
    long ones and ``1 / ((1 - s) / factor + s)`` between, where the smoothing
    ``s = orig / (h - l) * (1 / wavelen) - l / (h - l)`` is affine in ``1 / wavelen``.
    Only that affine map is identifiable, so ``original_max_position_embeddings`` is
    fixed to 8192 (Llama 3.x) and l, h are solved from it; any such choice yields the
    same frequencies because the schedule is continuous at both region boundaries.
    """
    r = freqs.double()
    factor = float(r.max())
    inv_wavelen = (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
                   ) / (2 * math.pi)
    mid = (r > 1 + 1e-4) & (r < factor * (1 - 1e-4))
    orig, low, high = 8192, 1.0, 4.0
    if int(mid.sum()) >= 2 and factor > 1:
        s = (1.0 / r[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(inv_wavelen[mid].numpy(), s.numpy(), 1)
        low = round(float(-b * orig / a), 3)
        high = round(float(low + orig / a), 3)
    else:
        logger.warning("rope_freqs has too few transition values; assuming low=1, high=4")
    return {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": orig}


def _config_from_file(gf: GGUFFile) -> dict[str, Any]:
    md = gf.metadata
    arch = md.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: GGUF architecture '{arch}' is not supported "
            f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    hf_arch, model_type, _ = _ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, np.ndarray):  # some converters write one value per layer
        kv_heads = int(kv_heads.max())
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    vocab = get("vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = tokens.count if isinstance(tokens, StringArray) else None
    names = {t.name for t in gf.tensors}
    theta = _float(get("rope.freq_base", 10000.0))

    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": _float(get("rope.scaling.factor", 1))}
        if get("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = int(
                get("rope.scaling.original_context_length"))
    elif "rope_freqs.weight" in names:
        info = next(t for t in gf.tensors if t.name == "rope_freqs.weight")
        rope_scaling = _detect_llama3_rope(dequantize(gf.raw(info), info.qtype, info.name),
                                           theta, int(head_dim))

    file_type = md.get("general.file_type")
    # Quantised files have no single source dtype; weights are dequantised to float32
    # (what iter_gguf_weights yields). Engines may downcast after loading.
    torch_dtype = {1: "float16", 32: "bfloat16"}.get(file_type, "float32")
    return {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "attention_bias": any(n.endswith("attn_q.bias") for n in names),
        "rms_norm_eps": _float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": torch_dtype,
    }


def read_gguf_config(path: str) -> dict[str, Any]:
    """Build a Hugging Face ``config.json``-style dict from a GGUF file's metadata.

    Supports GGUF architectures llama, mistral, qwen2 and qwen3. ``tie_word_embeddings``
    is True iff the file has no ``output.weight``. ``torch_dtype`` is "float16" /
    "bfloat16" for F16 / BF16 files and "float32" otherwise (quantised weights are
    dequantised to float32).

    Raises:
        ValueError: for files that are not GGUF or use an unsupported architecture.
    """
    return _config_from_file(open_gguf(path))


def hf_param_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to its HF parameter name (None: not an HF parameter).

    Raises:
        ValueError: for tensor names this loader does not know.
    """
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name in _NON_PARAMETER_TENSORS:
        return None
    match = _BLOCK_RE.match(gguf_name)
    if match is None or match.group(2) not in _BLOCK_TENSORS:
        raise ValueError(f"unknown GGUF tensor '{gguf_name}'")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[kind]}.{suffix}"


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (interleaved rotary pairs -> HF split halves).

    llama.cpp stores row ``(head, i, half)`` of HF row ``(head, half, i)``; swapping the
    two inner axes back restores HF order. Works for weights (2-D) and biases (1-D).
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(path: str, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every parameter stored in the GGUF file.

    Tensors are float32, in HF shape (``(out_features, in_features)`` for linears) and
    own their memory. ``lm_head.weight`` is only yielded if the file stores
    ``output.weight``; for tied files the consumer ties it to ``model.embed_tokens``.
    llama/mistral q_proj/k_proj rows are un-permuted back to HF's rotary layout.

    ``keep_quantized=True`` yields the decoder's Q8_0 / Q4_0 / Q4_1 linear weights as
    rtllm groupwise tensors instead (``<module>.weight`` codes, ``.weight_scale``,
    ``.weight_zero``; see :mod:`rtllm.quantization.gguf`); other tensors as above.

    Raises:
        ValueError: unsupported architecture or unknown tensor name.
        NotImplementedError: a tensor uses an unsupported quantisation type.
    """
    gf = open_gguf(path)
    config = _config_from_file(gf)
    permuted = _ARCHITECTURES[gf.metadata["general.architecture"]][2]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for info in gf.tensors:
        hf_name = hf_param_name(info.name)
        if hf_name is None:
            continue
        if info.qtype not in GGML_QUANT_SIZES:  # byte size unknown: cannot even slice it
            raise NotImplementedError(f"GGUF tensor '{info.name}' has unknown type id {info.qtype}")
        raw = gf.raw(info).reshape(*info.shape[:-1], -1)
        n_heads = None
        if permuted and ".self_attn.q_proj." in hf_name:
            n_heads = heads
        elif permuted and ".self_attn.k_proj." in hf_name:
            n_heads = kv_heads
        if keep_quantized and hf_name.startswith("model.layers.") and info.qtype in KEPT_TYPES \
                and hf_name.endswith("proj.weight") and len(info.shape) == 2:
            module = hf_name[: -len(".weight")]
            for suffix, tensor in gguf_to_groupwise(raw.clone(), info.qtype).items():
                # Codes, scales and zeros are all per row: un-permute them alike.
                yield f"{module}.{suffix}", tensor if n_heads is None else _unpermute_rotary(tensor, n_heads)
            continue
        tensor = dequantize(raw, info.qtype, info.name)
        if n_heads is not None:
            tensor = _unpermute_rotary(tensor, n_heads)
        yield hf_name, tensor
