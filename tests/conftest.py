"""Suite-wide set-up: on a machine without CUDA, Triton kernels run in its interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set
here, before any test module (or library it imports) can import a kernel module,
and before rtllm itself is imported.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from rtllm.kernels.interpreter import patch_triton_interpreter

    patch_triton_interpreter()


def byte_level_tokenizer() -> Any:
    """A 256-token byte-level BPE tokenizer (no merges): any text encodes, ids < 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token=None)


@pytest.fixture(scope="session")
def byte_tokenizer() -> Any:
    """:func:`byte_level_tokenizer`, for tiny checkpoints that calibrate on text."""
    return byte_level_tokenizer()
