"""prompt_attention (fresh prompts over their own K/V) against the float reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rtllm.kernels.paged_attention_ref import reference_attention  # noqa: E402
from rtllm.kernels.prompt_attention import prompt_attention, prompt_token_tables  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check(query_lens: list[int], heads: int, kv_heads: int, head_dim: int, window: int | None,
           dtype: torch.dtype, device: str, **tiles: int) -> None:
    gen = torch.Generator().manual_seed(sum(query_lens) + heads)
    t = sum(query_lens)
    q = torch.randn(t, heads, head_dim, generator=gen).to(device, dtype)
    # K contiguous, V a strided view of a wider "QKV" buffer: the token strides differ.
    k = torch.randn(t, kv_heads, head_dim, generator=gen).to(device, dtype)
    wide = torch.randn(t, kv_heads + 3, head_dim, generator=gen).to(device, dtype)
    v = wide[:, 1 : 1 + kv_heads]
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(query_lens, dtype=torch.int32, device=device)
    tables = prompt_token_tables(cu, max(query_lens))
    assert tables.dtype == torch.int32 and tables.shape == (len(query_lens), max(query_lens))
    assert int(tables.max()) == t - 1  # clamped to the last token
    out = torch.full_like(q, float("nan"))
    prompt_attention(q, k, v, cu, lens, tables, max(query_lens), head_dim**-0.5, window, out=out, **tiles)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for b in range(len(query_lens)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        expected = reference_attention(q[rows], k[rows], v[rows], 0, head_dim**-0.5, window)
        torch.testing.assert_close(out[rows].float(), expected, **tol)


@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 2, None), (4, 1, 5), (2, 2, None)])
def test_matches_reference(heads: int, kv_heads: int, window: int | None) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check([5, 19, 1, 33], heads, kv_heads, 32, window, torch.float32, device)


def test_rejects_mismatched_inputs() -> None:
    q = torch.zeros(4, 2, 16)
    k = torch.zeros(4, 1, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    lens = torch.tensor([4], dtype=torch.int32)
    tables = prompt_token_tables(cu, 4)
    with pytest.raises(ValueError, match="key/value dtype"):
        prompt_attention(q, k.half(), k.half(), cu, lens, tables, 4, 0.25)
    with pytest.raises(ValueError, match="one shape"):
        prompt_attention(q, k, torch.zeros(4, 2, 16), cu, lens, tables, 4, 0.25)
    with pytest.raises(ValueError, match="multiple"):
        prompt_attention(torch.zeros(4, 3, 16), torch.zeros(4, 2, 16), torch.zeros(4, 2, 16),
                         cu, lens, tables, 4, 0.25)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama_shapes(dtype: torch.dtype) -> None:
    _check([300, 1, 2048, 77], 32, 8, 128, None, dtype, "cuda")
    _check([300, 1, 129], 32, 8, 128, 64, dtype, "cuda")
