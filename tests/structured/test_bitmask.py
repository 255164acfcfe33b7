"""apply_bitmask: against xgrammar's CPU kernel, argument checks, no Triton on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import xgrammar as xgr

from rtllm.structured import apply_bitmask
from rtllm.structured.bitmask import _apply_with_torch, _disallowed, allocate_bitmask


def test_apply_bitmask_matches_xgrammar_cpu_kernel() -> None:
    """Both our paths (xgrammar's C++ kernel on CPU, the torch ops used on GPUs) against
    xgrammar's CPU kernel on plain contiguous logits."""
    gen = torch.Generator().manual_seed(1)
    vocab = 1000  # not a multiple of 32
    bitmask = allocate_bitmask(6, vocab + 64)  # wider and taller than needed
    bitmask.copy_(torch.randint(-(2**31), 2**31 - 1, bitmask.shape, generator=gen))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(5, vocab, generator=gen).to(dtype)
        for rows in (None, [3, 0]):
            reference = logits.clone()
            xgr.apply_token_bitmask_inplace(
                reference,
                bitmask[:5, :32].contiguous() if rows is None else bitmask[:, :32].contiguous(),
                vocab_size=vocab,
                indices=rows,
                backend="cpu",
            )
            ours, torch_path = logits.clone(), logits.clone()
            apply_bitmask(ours, bitmask, rows)
            _apply_with_torch(torch_path, bitmask[:, :32], list(range(5)) if rows is None else rows)
            assert torch.equal(ours, reference) and torch.equal(torch_path, reference)
            # column-strided logits (xgrammar's kernel gets these wrong): torch fallback
            strided = logits.t().contiguous().t()
            apply_bitmask(strided, bitmask, rows)
            assert torch.equal(strided, reference), (dtype, rows)
    doubles = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    expected = doubles.masked_fill(_disallowed(bitmask[:5, :32], vocab), float("-inf"))
    apply_bitmask(doubles, bitmask)
    assert torch.equal(doubles, expected)
    # bit 31 (the int32 sign bit) of each word belongs to the tokens 31, 63, ...
    only_63 = torch.zeros(1, 2, dtype=torch.int32)
    only_63[0, 1] = -(2**31)
    for logits in (torch.zeros(1, 64), torch.zeros(1, 64, dtype=torch.float64)):
        apply_bitmask(logits, only_63)
        assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [63]


def test_cpu_masking_never_imports_triton() -> None:
    """On CPU neither xgrammar nor our masking may reach a Triton kernel (the suite runs
    Triton in its interpreter there): checked in a fresh interpreter."""
    code = (
        "import sys, torch\n"
        "from rtllm.structured import allocate_bitmask, apply_bitmask\n"
        "logits, mask = torch.randn(3, 100), allocate_bitmask(3, 100)\n"
        "mask[0] = 0\n"
        "apply_bitmask(logits, mask, [0, 2])\n"
        "apply_bitmask(logits.double(), mask)\n"
        "assert torch.isinf(logits[0]).all() and 'triton' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_apply_bitmask_rejects_bad_arguments() -> None:
    logits = torch.zeros(2, 100)
    with pytest.raises(ValueError, match="covers 96 tokens but logits have 100"):
        apply_bitmask(logits, allocate_bitmask(2, 96))
    with pytest.raises(ValueError, match="int32 CPU tensor"):
        apply_bitmask(logits, allocate_bitmask(2, 100).to(torch.int64))
    with pytest.raises(ValueError, match=r"rows must be in \[0, 2\)"):
        apply_bitmask(logits, allocate_bitmask(4, 100), rows=[2])
    with pytest.raises(ValueError, match="distinct"):
        apply_bitmask(torch.zeros(3, 100), allocate_bitmask(3, 100), rows=[1, 1])
    with pytest.raises(ValueError, match="2-D float"):
        apply_bitmask(torch.zeros(2, 100, dtype=torch.int64), allocate_bitmask(2, 100))
    untouched = torch.zeros(2, 100)
    apply_bitmask(untouched, torch.zeros(2, 4, dtype=torch.int32), rows=[])
    assert torch.equal(untouched, torch.zeros(2, 100))
