"""Structured output (guided decoding): constrain generation to a JSON schema, a regex or
an EBNF grammar, using the ``xgrammar`` library.

- :class:`GuidedDecodingParams` says what the output must match (TensorRT-LLM's name).
- :class:`GrammarBackend` compiles it for a tokenizer and creates a :class:`RequestGrammar`
  per request; :func:`apply_bitmask` masks a batch of logits.

How :func:`apply_bitmask` masks: xgrammar's ``apply_token_bitmask_inplace`` picks its
implementation by device: a C++ kernel for CPU tensors, a Triton kernel for CUDA tensors.
On CPU we call the C++ kernel explicitly (``backend="cpu"``), so no Triton kernel is ever
reached there (the test suite sets ``TRITON_INTERPRET=1`` on CPU). On CUDA (and any other
device) we use a few elementwise torch ops instead of xgrammar's Triton kernel, because
that kernel is JIT-compiled in the serving process on first use against whatever
``triton`` is installed (xgrammar does not pin it; untested here with torch 2.11 +
triton 3.6), and because its ``indices`` argument costs a second host->device copy, where
ours packs the row indices into the single copy of the mask. The torch path is checked
on CPU against the C++ kernel; it is also the CPU fallback for float64 logits and for
logits with a column stride != 1, which xgrammar 0.2.8's CPU kernel masks wrongly.
"""

from typing import Any

from rtllm.structured.params import GuidedDecodingParams

# xgrammar takes ~1 s to import: the grammar machinery loads on first use, so that
# `import rtllm` (which exports GuidedDecodingParams) stays fast.
_LAZY = {
    "allocate_bitmask": "rtllm.structured.bitmask",
    "apply_bitmask": "rtllm.structured.bitmask",
    "GrammarBackend": "rtllm.structured.grammar",
    "RequestGrammar": "rtllm.structured.grammar",
    "build_tokenizer_info": "rtllm.structured.grammar",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "GrammarBackend",
    "GuidedDecodingParams",
    "RequestGrammar",
    "allocate_bitmask",
    "apply_bitmask",
    "build_tokenizer_info",
]
