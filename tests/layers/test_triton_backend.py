"""TritonAttentionBackend against TorchAttentionBackend (outputs and cache contents)."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # without CUDA, tests/conftest.py selects Triton's interpreter

pytest.importorskip("triton")

from rtllm.layers.attention_backends import (  # noqa: E402
    AttentionLayerSpec,
    StepAttentionInputs,
    TorchAttentionBackend,
    get_attention_backend,
)
from rtllm.layers.attention_backends.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def _tables(seq_lens: list[int], tokens_per_block: int, seed: int) -> tuple[list[list[int]], int]:
    """Shuffled, disjoint block tables (with one spare block) and the block count."""
    counts = [max(1, -(-s // tokens_per_block)) for s in seq_lens]
    total = sum(counts) + 1
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, used = [], 0
    for n in counts:
        tables.append(perm[used : used + n])
        used += n
    return tables, total


def _compare_step(
    spec: AttentionLayerSpec,
    query_lens: list[int],
    context_lens: list[int],
    tokens_per_block: int,
    dtype: torch.dtype,
    device: torch.device = DEVICE,
    tol: float | None = None,
) -> None:
    """Run one step through both backends on identical caches; compare outputs and caches."""
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    tables, num_blocks = _tables(seq_lens, tokens_per_block, seed=sum(seq_lens))
    inputs = StepAttentionInputs(query_lens, context_lens, tables, tokens_per_block, device)
    gen = torch.Generator().manual_seed(len(query_lens))
    t = sum(query_lens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q = rand(t, spec.num_heads, spec.head_dim)
    k, v = rand(t, spec.num_kv_heads, spec.head_dim), rand(t, spec.num_kv_heads, spec.head_dim)
    cache = rand(2, num_blocks, tokens_per_block, spec.num_kv_heads, spec.head_dim)
    torch_cache, triton_cache = cache.clone(), cache.clone()
    torch_backend, triton_backend = TorchAttentionBackend(), TritonAttentionBackend()
    expected = torch_backend.forward(
        spec, q, k, v, torch_cache, torch_backend.build_metadata(inputs)
    )
    metadata = triton_backend.build_metadata(inputs)
    assert metadata.is_decode == all(n == 1 for n in query_lens)
    out = triton_backend.forward(spec, q, k, v, triton_cache, metadata)
    tol = tol or (1e-4 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(triton_cache, torch_cache, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def _spec(group: int, head_dim: int, window: int | None = None) -> AttentionLayerSpec:
    kv_heads = 2 if group < 8 else 1
    return AttentionLayerSpec(kv_heads * group, kv_heads, head_dim, head_dim**-0.5, window)


def test_registered() -> None:
    assert isinstance(get_attention_backend("triton"), TritonAttentionBackend)
    assert TritonAttentionBackend.name == "triton"


@pytest.mark.parametrize(
    ("tokens_per_block", "group", "head_dim", "window", "dtype"),
    [
        (16, 1, 64, None, torch.float32),
        (32, 4, 128, None, torch.float16),
        (64, 8, 64, None, torch.float32),
        (16, 4, 64, 6, torch.float32),
    ],
)
@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [
        ([7, 3], [0, 0]),  # prefill
        ([1, 9, 1, 4], [20, 0, 5, 33]),  # mixed: decodes, a prompt, a chunk after a prefix
        ([1, 1, 1], [0, 16, 40]),  # decode-only
        ([1, 1, 8, 5], [12, 30, 0, 0]),  # decodes, then fresh prompts (decode kernel + prompt path)
        ([1, 4, 9], [20, 33, 0]),  # a decode and a chunk, then a fresh prompt (context kernel + prompt path)
    ],
    ids=["prefill", "mixed", "decode", "decodes-then-prompts", "chunk-then-prompt"],
)
def test_matches_torch_backend(
    tokens_per_block: int,
    group: int,
    head_dim: int,
    window: int | None,
    dtype: torch.dtype,
    query_lens: list[int],
    context_lens: list[int],
) -> None:
    _compare_step(_spec(group, head_dim, window), query_lens, context_lens, tokens_per_block, dtype)


def test_metadata_layout() -> None:
    inputs = StepAttentionInputs([2, 1], [3, 0], [[4, 1], [2]], 4, DEVICE)
    md = TritonAttentionBackend().build_metadata(inputs)
    assert md.slot_mapping.tolist() == [4 * 4 + 3, 1 * 4 + 0, 2 * 4 + 0]
    assert md.block_tables.tolist() == [[4, 1], [2, 0]]
    assert md.cu_seqlens_q.tolist() == [0, 2, 3]
    assert md.seq_lens.tolist() == [5, 1]
    assert md.context_lens.tolist() == [3, 0]
    for t in (md.slot_mapping, md.block_tables, md.cu_seqlens_q, md.seq_lens, md.context_lens):
        assert t.dtype == torch.int32 and t.device.type == DEVICE.type
    assert (md.batch_size, md.num_tokens, md.max_query_len, md.max_seq_len) == (2, 3, 2, 5)
    assert not md.is_decode
    with pytest.raises(ValueError, match="cannot hold"):
        TritonAttentionBackend().build_metadata(StepAttentionInputs([9], [0], [[0]], 4, DEVICE))


def test_padded_decode_metadata_into_buffers() -> None:
    """Fixed buffers for a padded batch (through the CUDA-graph hooks) give the real rows'
    results, skip padded rows' K/V writes, and keep their addresses from step to step."""
    spec, bs, padded = _spec(4, 32), 16, 5
    backend = TritonAttentionBackend()
    backend.init_graph_buffers(8, 4, 64, DEVICE)
    md = backend.graph_metadata(padded)
    pointers = [t.data_ptr() for t in (md.slot_mapping, md.seq_lens, md.block_tables)]
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 12, bs, spec.num_kv_heads, spec.head_dim, generator=gen).to(DEVICE)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(padded, heads, spec.head_dim, generator=gen).to(DEVICE)

    # Padding only (what capture uses): nothing written, zeros out.
    backend.fill_graph_metadata(padded, StepAttentionInputs([], [], [], bs, DEVICE))
    assert md.slot_mapping.tolist() == [-1] * padded and md.seq_lens.tolist() == [0] * padded
    before = cache.clone()
    q, k, v = rand(spec.num_heads), rand(spec.num_kv_heads), rand(spec.num_kv_heads)
    assert not backend.forward(spec, q, k, v, cache, md).any()
    torch.testing.assert_close(cache, before, rtol=0, atol=0)

    for context_lens in ([5, 30, 16], [6, 31, 17]):  # two consecutive decode steps
        inputs = StepAttentionInputs([1, 1, 1], context_lens, [[3], [7, 1], [0, 9]], bs, DEVICE)
        backend.fill_graph_metadata(padded, inputs)
        assert md.slot_mapping.tolist()[3:] == [-1, -1] and md.seq_lens.tolist()[3:] == [0, 0]
        assert md.seq_lens.tolist()[:3] == [c + 1 for c in context_lens]
        assert [t.data_ptr() for t in (md.slot_mapping, md.seq_lens, md.block_tables)] == pointers
        q, k, v = rand(spec.num_heads), rand(spec.num_kv_heads), rand(spec.num_kv_heads)
        ref_cache = cache.clone()
        ref_backend = TorchAttentionBackend()
        expected = ref_backend.forward(
            spec, q[:3], k[:3], v[:3], ref_cache, ref_backend.build_metadata(inputs)
        )
        out = backend.forward(spec, q, k, v, cache, md)
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
        torch.testing.assert_close(out[:3], expected, rtol=1e-4, atol=1e-4)
        assert not out[3:].any()
    with pytest.raises(ValueError, match="one new token"):
        backend.fill_graph_metadata(padded, StepAttentionInputs([2], [0], [[1]], bs, DEVICE))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("tokens_per_block", "group", "head_dim", "window"),
    [(16, 1, 128, None), (32, 4, 128, None), (64, 8, 64, None), (32, 4, 128, 512)],
)
@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [
        ([1500, 700], [0, 0]),
        ([1, 900, 1, 256, 1], [3000, 0, 17, 2048, 8000]),
        ([1] * 64, [int(x) for x in torch.arange(64) * 131 + 5]),
    ],
    ids=["prefill", "mixed", "decode"],
)
def test_gpu_matches_torch_backend(
    dtype: torch.dtype,
    tokens_per_block: int,
    group: int,
    head_dim: int,
    window: int | None,
    query_lens: list[int],
    context_lens: list[int],
) -> None:
    _compare_step(
        _spec(group, head_dim, window), query_lens, context_lens, tokens_per_block, dtype, tol=2e-2
    )


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay_with_fixed_buffers() -> None:
    """Capture one padded decode step in a CUDA graph, replay it for later steps."""
    spec, bs, padded, dtype = _spec(4, 128), 16, 4, torch.bfloat16
    device = torch.device("cuda")
    backend, ref_backend = TritonAttentionBackend(), TorchAttentionBackend()
    backend.init_graph_buffers(8, 64, 1024, device)
    tables, num_blocks = _tables([1000, 1000, 1000], bs, seed=3)
    cache = torch.randn(2, num_blocks, bs, spec.num_kv_heads, spec.head_dim, device=device)
    cache = cache.to(dtype)
    q = torch.zeros(padded, spec.num_heads, spec.head_dim, device=device, dtype=dtype)
    k = torch.zeros(padded, spec.num_kv_heads, spec.head_dim, device=device, dtype=dtype)
    v = torch.zeros_like(k)

    def step_inputs(step: int) -> StepAttentionInputs:
        return StepAttentionInputs([1, 1, 1], [5 + step, 700 + step, 16 + step], tables, bs, device)

    md = backend.graph_metadata(padded)
    backend.fill_graph_metadata(padded, step_inputs(0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
        backend.forward(spec, q, k, v, cache.clone(), md)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(spec, q, k, v, cache, md)
    for step in range(3):
        inputs = step_inputs(step)
        backend.fill_graph_metadata(padded, inputs)
        for t in (q, k, v):
            t.normal_()
        ref_cache = cache.clone()
        expected = ref_backend.forward(
            spec, q[:3], k[:3], v[:3], ref_cache, ref_backend.build_metadata(inputs)
        )
        graph.replay()
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
        torch.testing.assert_close(out[:3], expected, rtol=2e-2, atol=2e-2)
        assert not out[3:].any()
