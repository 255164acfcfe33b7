"""Suite-wide set-up: on a machine without CUDA, Triton kernels run in its interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set
here, before any test module (or library it imports) can import a kernel module.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
