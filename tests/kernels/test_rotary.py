"""rotary_embedding (Triton) against its PyTorch reference, and RotaryEmbedding's dispatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402
from rtllm.layers import rotary as rotary_module  # noqa: E402
from rtllm.layers.rotary import RotaryEmbedding  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _qk_views(
    tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] and k [T, Hkv, D] as views into a fused QKV buffer (like the model)."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(device, dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return q, k


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (3, 5, 24), (2, 1, 64)])
def test_matches_reference(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    torch.manual_seed(head_dim)
    tokens, max_position = 5, 40
    q, k = _qk_views(tokens, heads, kv_heads, head_dim, dtype, device)
    cos = torch.randn(max_position, head_dim // 2, device=device)
    sin = torch.randn(max_position, head_dim // 2, device=device)
    positions = torch.tensor([0, 39, 7, 7, 12], device=device, dtype=torch.int32)
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = rotary_embedding(positions, q, k, cos, sin)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, cos, sin)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref, **_tol(dtype))
    torch.testing.assert_close(k_out, k_ref, **_tol(dtype))
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def test_inplace_matches_out_of_place(device: torch.device) -> None:
    torch.manual_seed(0)
    q, k = _qk_views(4, 4, 2, 32, torch.float16, device)
    cos, sin = torch.randn(2, 16, 16, device=device).unbind(0)
    positions = torch.arange(4, device=device) * 3
    expected_q, expected_k = rotary_embedding(positions, q, k, cos, sin)
    q_out, k_out = rotary_embedding(positions, q, k, cos, sin, inplace=True)
    assert q_out is q and k_out is k
    torch.testing.assert_close(q, expected_q, rtol=0, atol=0)
    torch.testing.assert_close(k, expected_k, rtol=0, atol=0)


def test_with_the_layers_llama3_caches(device: torch.device) -> None:
    """Fed the layer's float32 caches, the kernel matches the layer's float32 torch path."""
    layer = RotaryEmbedding(32, 256, 500000.0, LLAMA3_SCALING)
    torch.manual_seed(1)
    q, k = _qk_views(6, 4, 2, 32, torch.float32, "cpu")
    positions = torch.tensor([0, 1, 2, 100, 200, 255])
    expected_q, expected_k = layer(positions, q, k)
    cos, sin = layer.cos_cached.to(device), layer.sin_cached.to(device)
    q_out, k_out = rotary_embedding(positions.to(device), q.to(device), k.to(device), cos, sin)
    torch.testing.assert_close(q_out.cpu(), expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.cpu(), expected_k, rtol=1e-5, atol=1e-5)


def test_empty_batch(device: torch.device) -> None:
    q, k = torch.empty(0, 4, 16, device=device), torch.empty(0, 2, 16, device=device)
    cos = torch.zeros(8, 8, device=device)
    positions = torch.empty(0, dtype=torch.int64, device=device)
    q_out, k_out = rotary_embedding(positions, q, k, cos, cos)
    assert q_out.shape == (0, 4, 16) and k_out.shape == (0, 2, 16)


def test_rejects_bad_inputs() -> None:
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cos = torch.randn(10, 8)
    positions = torch.arange(3)
    with pytest.raises(ValueError, match="key must be"):
        rotary_embedding(positions, q, torch.randn(2, 2, 16), cos, cos)
    with pytest.raises(ValueError, match="share a"):
        rotary_embedding(positions, q, k.half(), cos, cos)
    with pytest.raises(ValueError, match="cos_cache must be"):
        rotary_embedding(positions, q, k, torch.randn(10, 16), cos)
    with pytest.raises(ValueError, match="positions must be"):
        rotary_embedding(positions.float(), q, k, cos, cos)
    with pytest.raises(ValueError, match="contiguous"):
        rotary_embedding(positions, q.transpose(1, 2).contiguous().transpose(1, 2), k, cos, cos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_cpu_path_is_unchanged(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel(*args: object) -> None:
        raise AssertionError("the Triton kernel must not be looked up on CPU")

    monkeypatch.setattr(rotary_module, "fused_kernel", no_kernel)
    layer = RotaryEmbedding(16, 64, 10000.0)
    torch.manual_seed(2)
    q, k = _qk_views(5, 4, 2, 16, dtype, "cpu")
    positions = torch.tensor([3, 4, 5, 60, 0])
    q_out, k_out = layer(positions, q, k)
    # The HF formula in the activation dtype: cos/sin cast first, rounding per operation.
    cos = layer.cos_cached[positions].to(dtype).unsqueeze(1)
    sin = layer.sin_cached[positions].to(dtype).unsqueeze(1)
    for x, out in ((q, q_out), (k, k_out)):
        x1, x2 = x.chunk(2, dim=-1)
        assert torch.equal(out, torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    # cos/sin are looked up once per positions tensor (one step, every layer).
    cached = layer._last_cos_sin
    layer(positions, q, k)
    assert layer._last_positions is positions and layer._last_cos_sin is cached
    layer(positions.clone(), q, k)
    assert layer._last_cos_sin is not cached


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens", [1, 8192])
def test_gpu_realistic(dtype: torch.dtype, head_dim: int, tokens: int) -> None:
    layer = RotaryEmbedding(head_dim, 131072, 500000.0, LLAMA3_SCALING).cuda()
    q, k = _qk_views(tokens, 32, 8, head_dim, dtype, "cuda")
    positions = torch.randint(0, 131072, (tokens,), device="cuda")
    cos, sin = layer.cos_cached, layer.sin_cached
    q_out, k_out = rotary_embedding(positions, q, k, cos, sin)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref)  # dtype defaults
    torch.testing.assert_close(k_out, k_ref)
    q_in, k_in = q.clone(), k.clone()
    rotary_embedding(positions, q_in, k_in, cos, sin, inplace=True)
    torch.testing.assert_close(q_in, q_out, rtol=0, atol=0)
    torch.testing.assert_close(k_in, k_out, rtol=0, atol=0)


@pytest.mark.gpu
@requires_cuda
def test_gpu_layer_uses_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = rotary_module.fused_kernel("rotary", "rotary_embedding")
    assert real is not None, "Triton should import on a CUDA machine"

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rotary_module, "fused_kernel", lambda *args: counting)
    layer = RotaryEmbedding(128, 8192, 500000.0, LLAMA3_SCALING).cuda()
    q, k = _qk_views(64, 32, 8, 128, torch.bfloat16, "cuda")
    positions = torch.randint(0, 8192, (64,), device="cuda")
    q_out, k_out = layer(positions, q, k)
    assert calls == [1]
    # Against the HF-style bf16 torch path: rounding per operation, a few bf16 ulp apart.
    cos = layer.cos_cached[positions].to(q.dtype).unsqueeze(1)
    sin = layer.sin_cached[positions].to(q.dtype).unsqueeze(1)
    for x, out in ((q, q_out), (k, k_out)):
        x1, x2 = x.chunk(2, dim=-1)
        expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=5e-2)
