"""Programmatic dependent launch: a decode-layer chain of PDL kernels, captured in a
CUDA graph, gives the same bits as the same chain launched without PDL."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.decode_attention import decode_attention  # noqa: E402
from rtllm.kernels.kv_cache_write import write_kv_cache  # noqa: E402
from rtllm.kernels.pdl import use_pdl  # noqa: E402
from rtllm.kernels.quant_gemm import QuantGemmConfig, prepack_int4, prepack_int8, quant_linear  # noqa: E402
from rtllm.kernels.rms_norm import rms_norm  # noqa: E402
from rtllm.kernels.rotary import rotary_embedding  # noqa: E402
from rtllm.kernels.silu_and_mul import silu_and_mul  # noqa: E402

requires_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a CUDA GPU of compute capability 9.0+",
)


def random_packed(n: int, k: int, bits: int, group_size: int, seed: int) -> object:
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.int32)
    scales = torch.exp(torch.empty(n, groups).uniform_(-6.5, -4.0, generator=gen))
    pack = prepack_int4 if bits == 4 else prepack_int8
    return pack(codes, zeros, scales, group_size, device="cuda")


def test_pdl_off_on_cpu_and_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not use_pdl(torch.device("cpu"))
    monkeypatch.setenv("RTLLM_PDL", "0")
    assert not use_pdl(torch.device("cuda", 0))  # no device query needed when disabled


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("split_k", [1, 4])
def test_gpu_layer_chain_in_graph_matches_without_pdl(
    monkeypatch: pytest.MonkeyPatch, split_k: int
) -> None:
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    hidden, heads, kv_heads, head_dim, ffn, tokens_per_block = 1024, 8, 2, 128, 2048, 16
    qkv_w = random_packed((heads + 2 * kv_heads) * head_dim, hidden, 4, 128, seed=1)
    o_w = random_packed(hidden, heads * head_dim, 8, -1, seed=2)
    up_w = random_packed(2 * ffn, hidden, 4, 128, seed=3)
    down_w = random_packed(hidden, ffn, 4, 128, seed=4)
    cfg = QuantGemmConfig(kernel="gemv", block_n=8, chunk=32, split_k=split_k, num_warps=1)
    norm_w = torch.rand(hidden, device=dev, dtype=dt) + 0.5
    cos = torch.rand(64, head_dim // 2, device=dev)
    sin = torch.rand(64, head_dim // 2, device=dev)
    kv_cache = torch.zeros(2, 8, tokens_per_block, kv_heads, head_dim, device=dev, dtype=dt)
    kv_cache[:, :, :] = torch.randn_like(kv_cache) * 0.5  # earlier tokens
    seq_lens = torch.tensor([40], dtype=torch.int32, device=dev)
    tables = torch.arange(8, dtype=torch.int32, device=dev)[None]
    slot = torch.tensor([39], dtype=torch.int32, device=dev)
    pos = torch.tensor([39], dtype=torch.int32, device=dev)
    x0 = torch.randn(1, hidden, device=dev, dtype=dt)

    def layer(x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, res = rms_norm(x, norm_w, 1e-5, x.clone())
        qkv = quant_linear(h, qkv_w, None, cfg)
        q = qkv[:, : heads * head_dim].view(1, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(1, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim :].view(1, kv_heads, head_dim)
        q, k = rotary_embedding(pos, q, k, cos, sin)
        write_kv_cache(k, v, cache, slot)
        attn = decode_attention(q, cache, seq_lens, tables, head_dim**-0.5, num_splits=4)
        o = quant_linear(attn.reshape(1, -1), o_w, None, cfg)
        h, res = rms_norm(o, norm_w, 1e-5, res)
        act = silu_and_mul(quant_linear(h, up_w, None, cfg))
        return quant_linear(act, down_w, None, cfg) + res, res

    def run(pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setenv("RTLLM_PDL", "1" if pdl else "0")
        assert use_pdl(dev) == pdl
        cache = kv_cache.clone()
        x = x0.clone()
        layer(x, cache.clone())  # compile before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x
            for _ in range(4):  # layers back to back: kernel after kernel
                y, _ = layer(y, cache)
        graph.replay()
        torch.cuda.synchronize()
        return y.clone(), cache.clone()

    out_off, cache_off = run(False)
    out_on, cache_on = run(True)
    assert torch.isfinite(out_on.float()).all()
    assert torch.equal(out_on, out_off)
    assert torch.equal(cache_on, cache_off)
