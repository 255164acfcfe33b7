"""Quantized KV cache through the attention backends, the runner's block operations
and memory planning.

FP8 through the Triton backend runs on CUDA only: the backend's write kernel converts
float32 to float8, which Triton 3.6's CPU interpreter gets wrong (see
``tests/kernels/test_kv_quant.py``); the torch backend's FP8 emulation runs everywhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rtllm.kernels.kv_quant import (
    QuantizedKVCache,
    dequantize_kv_cache,
    kv_cache_parts,
)
from rtllm.layers.attention_backends import (
    AttentionLayerSpec,
    StepAttentionInputs,
    TorchAttentionBackend,
)
from rtllm.runtime.model_runner import ModelRunner

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
FP8 = torch.float8_e4m3fn
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
BS = 8
# Mixed step: decodes, a prompt, a chunk after a cached prefix.
QUERY_LENS, CONTEXT_LENS = [1, 9, 1, 4], [20, 0, 5, 33]


def _step(
    spec: AttentionLayerSpec,
    dtype: torch.dtype,
    seed: int = 0,
    query_lens: list[int] = QUERY_LENS,
    context_lens: list[int] = CONTEXT_LENS,
):
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    counts = [-(-s // BS) for s in seq_lens]
    perm = torch.randperm(sum(counts) + 1, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, used = [], 0
    for n in counts:
        tables.append(perm[used : used + n])
        used += n
    inputs = StepAttentionInputs(query_lens, context_lens, tables, BS, DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    t, d = sum(query_lens), spec.head_dim
    q, k, v = (torch.randn(t, h, d, generator=gen).to(DEVICE, dtype)
               for h in (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads))
    # The cached prefix: random float K/V, written once through the torch backend's path.
    prefix = torch.randn(2, sum(counts) + 1, BS, spec.num_kv_heads, d, generator=gen).to(DEVICE, dtype)
    return inputs, q, k, v, prefix


def _quantized_like(prefix: torch.Tensor, qdtype: torch.dtype) -> QuantizedKVCache:
    """``prefix`` stored quantized (through the torch backend's own write path)."""
    from rtllm.kernels.kv_quant import quantize_kv_cache

    return quantize_kv_cache(prefix, qdtype)


@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_torch_backend_quantized_close_to_float(qdtype: torch.dtype) -> None:
    spec = AttentionLayerSpec(8, 2, 64, 64**-0.5)
    inputs, q, k, v, prefix = _step(spec, torch.float32)
    backend = TorchAttentionBackend()
    metadata = backend.build_metadata(inputs)
    exact = backend.forward(spec, q, k, v, prefix.clone(), metadata)
    layer = _quantized_like(prefix, qdtype)
    out = backend.forward(spec, q, k, v, layer, metadata)
    err = (out - exact).abs()
    # Same bounds as the kernel tests (max relative to the output's max, mean absolute).
    max_bound, mean_bound = {torch.int8: (0.015, 0.004), FP8: (2.0**-4, 0.015)}[qdtype]
    assert err.max() <= max_bound * exact.abs().max() and err.mean() <= mean_bound
    # The new rows were quantized into the cache: dequantized they match k/v closely.
    slots = metadata.slot_mapping.long()
    deq = dequantize_kv_cache(layer, torch.float32).view(2, -1, spec.num_kv_heads, spec.head_dim)
    step = 2.0**-4 if qdtype == FP8 else 1 / 127
    assert ((deq[0, slots] - k).abs() <= step * k.abs().amax(-1, keepdim=True)).all()
    assert ((deq[1, slots] - v).abs() <= step * v.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("qdtype", [torch.int8, pytest.param(FP8, marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_matches_torch_backend(qdtype: torch.dtype, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from rtllm.layers.attention_backends.triton_backend import TritonAttentionBackend

    spec = AttentionLayerSpec(8, 2, 64, 64**-0.5)
    inputs, q, k, v, prefix = _step(spec, dtype, seed=5)
    torch_layer, triton_layer = _quantized_like(prefix, qdtype), _quantized_like(prefix, qdtype)
    torch_backend, triton_backend = TorchAttentionBackend(), TritonAttentionBackend()
    expected = torch_backend.forward(spec, q, k, v, torch_layer, torch_backend.build_metadata(inputs))
    out = triton_backend.forward(spec, q, k, v, triton_layer, triton_backend.build_metadata(inputs))
    assert out.dtype == dtype
    torch.testing.assert_close(triton_layer.scale, torch_layer.scale, rtol=1e-6, atol=0)
    code_step = 1.0 if qdtype == torch.int8 else torch_layer.data.float().abs() * 2.0**-3 + 2.0**-9
    assert ((triton_layer.data.float() - torch_layer.data.float()).abs() <= code_step).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    # Decode-only steps take the split-K kernel.
    tables = [inputs.block_tables[0], inputs.block_tables[3]]  # room for one more token each
    decode = StepAttentionInputs([1, 1], [21, 37], tables, BS, DEVICE)
    metadata = triton_backend.build_metadata(decode)
    assert metadata.is_decode
    out = triton_backend.forward(spec, q[:2], k[:2], v[:2], triton_layer, metadata)
    expected = torch_backend.forward(spec, q[:2], k[:2], v[:2], torch_layer, torch_backend.build_metadata(decode))
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("qdtype", [torch.int8, pytest.param(FP8, marks=requires_cuda)])
def test_triton_backend_fresh_prompts_attend_unquantized(qdtype: torch.dtype) -> None:
    """A step of prompts with no cached prefix attends over its fresh K/V (float), and
    still writes the codes the torch backend writes; a step with a prefix reads codes."""
    pytest.importorskip("triton")
    from rtllm.kernels.paged_attention_ref import reference_attention
    from rtllm.layers.attention_backends.triton_backend import TritonAttentionBackend

    spec = AttentionLayerSpec(8, 2, 64, 64**-0.5)
    query_lens = [9, 3, 17]
    tables = [[4, 0], [2], [5, 1, 3]]
    inputs = StepAttentionInputs(query_lens, [0, 0, 0], tables, BS, DEVICE)
    assert inputs.fresh_prompt_start == 0
    assert StepAttentionInputs([4, 1], [0, 3], [[0], [1]], BS, DEVICE).fresh_prompt_start == 2
    assert StepAttentionInputs([1, 4], [3, 0], [[0], [1]], BS, DEVICE).fresh_prompt_start == 1
    gen = torch.Generator().manual_seed(11)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, 64, generator=gen).to(DEVICE)
               for h in (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads))
    zeros = torch.zeros(2, 7, BS, spec.num_kv_heads, 64, device=DEVICE)
    triton_layer, torch_layer = _quantized_like(zeros, qdtype), _quantized_like(zeros, qdtype)
    backend = TritonAttentionBackend()
    metadata = backend.build_metadata(inputs)
    assert metadata.fresh_start == 0
    out = backend.forward(spec, q, k, v, triton_layer, metadata)
    start = 0
    for n in query_lens:
        rows = slice(start, start + n)
        expected = reference_attention(q[rows], k[rows], v[rows], 0, spec.scale)
        torch.testing.assert_close(out[rows], expected, rtol=1e-4, atol=1e-4)
        start += n
    # The cache holds the same codes the torch backend's write path stores.
    torch_backend = TorchAttentionBackend()
    quantized = torch_backend.forward(spec, q, k, v, torch_layer, torch_backend.build_metadata(inputs))
    torch.testing.assert_close(triton_layer.scale, torch_layer.scale, rtol=1e-6, atol=0)
    code_step = 1.0 if qdtype == torch.int8 else torch_layer.data.float().abs() * 2.0**-3 + 2.0**-9
    assert ((triton_layer.data.float() - torch_layer.data.float()).abs() <= code_step).all()
    # ... and the torch backend (the reference emulation) attended over those codes.
    assert (quantized - out).abs().max() > 0


@pytest.mark.parametrize("qdtype", [torch.int8, pytest.param(FP8, marks=requires_cuda)])
@pytest.mark.parametrize(
    ("query_lens", "context_lens", "cached_is_decode"),
    [([1, 1, 7, 5], [20, 5, 0, 0], True), ([4, 9], [33, 0], False)],
    ids=["decodes-then-prompts", "chunk-then-prompt"],
)
def test_triton_backend_mixed_step_fresh_prompts_apart(
    qdtype: torch.dtype, query_lens: list[int], context_lens: list[int], cached_is_decode: bool
) -> None:
    """In a mixed step over a quantized cache, the trailing fresh prompts attend over
    their own float K/V while the sequences before them read the codes (decode kernel
    when each has one new token, context kernel otherwise), as the torch backend does."""
    pytest.importorskip("triton")
    from rtllm.kernels.paged_attention_ref import reference_attention
    from rtllm.layers.attention_backends.triton_backend import TritonAttentionBackend

    spec = AttentionLayerSpec(8, 2, 64, 64**-0.5)
    inputs, q, k, v, prefix = _step(spec, torch.float32, 3, query_lens, context_lens)
    num_cached = sum(1 for c in context_lens if c)
    assert inputs.fresh_prompt_start == num_cached
    torch_layer, triton_layer = _quantized_like(prefix, qdtype), _quantized_like(prefix, qdtype)
    backend, torch_backend = TritonAttentionBackend(), TorchAttentionBackend()
    metadata = backend.build_metadata(inputs)
    assert metadata.fresh_start == num_cached and metadata.cached_is_decode == cached_is_decode
    out = backend.forward(spec, q, k, v, triton_layer, metadata)
    over_codes = torch_backend.forward(spec, q, k, v, torch_layer, torch_backend.build_metadata(inputs))
    start = 0
    for n, c in zip(query_lens, context_lens, strict=True):
        rows = slice(start, start + n)
        if c:
            torch.testing.assert_close(out[rows], over_codes[rows], rtol=1e-4, atol=1e-4)
        else:
            expected = reference_attention(q[rows], k[rows], v[rows], 0, spec.scale)
            torch.testing.assert_close(out[rows], expected, rtol=1e-4, atol=1e-4)
            assert (over_codes[rows] - out[rows]).abs().max() > 0  # the codes were not read
        start += n
    # A fresh prompt that is not at the end of the step leaves the step to the context kernel.
    assert StepAttentionInputs([9, 1], [0, 5], [[0, 1], [2]], BS, DEVICE).fresh_prompt_start == 2
    assert backend.build_metadata(StepAttentionInputs([9, 1], [0, 5], [[0, 1], [2]], BS, DEVICE)).fresh_start is None


def _runner(kv_dtype: torch.dtype | None) -> ModelRunner:
    config = SimpleNamespace(num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
    return ModelRunner(None, config, torch.float32, torch.device("cpu"), BS, "torch", kv_dtype)


@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_runner_block_operations_move_scales(qdtype: torch.dtype) -> None:
    runner = _runner(qdtype)
    runner.allocate_kv_cache(6)
    assert all(isinstance(layer, QuantizedKVCache) for layer in runner.kv_caches)
    runner._zero_new_blocks(5)
    for layer in runner.kv_caches:
        assert layer.data.dtype == qdtype and not layer.scale.any() and not layer.data.float().any()
        part_data, part_scale = kv_cache_parts(layer)
        part_data[:, 1].copy_(torch.randint(0, 100, part_data[:, 1].shape, dtype=torch.uint8))
        layer.scale[:, 1].uniform_(0.5, 2.0)

    def block(b: int) -> list[torch.Tensor]:
        return [dequantize_kv_cache(layer, torch.float32)[:, b] for layer in runner.kv_caches]

    runner.copy_block(1, 3)  # copy-on-write of a forked sequence's partial block
    assert all(torch.equal(a, b) for a, b in zip(block(1), block(3), strict=True))
    runner.allocate_host_cache(4)
    assert all(isinstance(h, QuantizedKVCache) for h in runner.host_kv_caches)
    runner.offload(1, 2)
    runner.onload(2, 4)
    assert all(torch.equal(a, b) for a, b in zip(block(1), block(4), strict=True))
    assert all(a.abs().sum() > 0 for a in block(4))


def test_memory_planning_counts_codes_and_scales() -> None:
    from rtllm.runtime.memory import kv_bytes_per_block

    config = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64)
    bf16 = kv_bytes_per_block(config, 32, torch.bfloat16)
    assert bf16 == 30 * 3 * 32 * 2 * 64 * 2
    for qdtype in (torch.int8, FP8):
        quant = kv_bytes_per_block(config, 32, torch.bfloat16, qdtype)
        assert quant == 30 * 3 * 32 * 2 * (64 + 4)  # 1-byte codes + a float32 scale per row
        assert bf16 / quant == pytest.approx(2 * 64 / 68)  # 1.88x the tokens per byte
    runner = _runner(torch.int8)
    runner.allocate_kv_cache(3)
    allocated = sum(t.numel() * t.element_size() for layer in runner.kv_caches for t in layer)
    assert allocated == 3 * kv_bytes_per_block(runner.config, BS, torch.float32, torch.int8)
