"""Suite-wide set-up: on a machine without CUDA, Triton kernels run in its interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set
here, before any test module (or library it imports) can import a kernel module,
and before rtllm itself is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from rtllm.kernels.interpreter import patch_triton_interpreter

    patch_triton_interpreter()
