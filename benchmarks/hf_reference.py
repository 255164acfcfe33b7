"""transformers ``generate`` on the GPU, measured with the shared baseline's own
functions (``hf_baseline.py``, passed by path), minus its slow torch.compile part.

    python benchmarks/hf_reference.py PATH/TO/hf_baseline.py [bw] [8b] [small]
"""

from __future__ import annotations

import importlib.util
import sys

import torch


def main() -> None:
    spec = importlib.util.spec_from_file_location("hf_baseline", sys.argv[1])
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    which = sys.argv[2:] or ["bw", "8b", "small"]
    base.emit(what="env", torch=torch.__version__, gpu=torch.cuda.get_device_name())
    if "bw" in which:
        base.bandwidth()
    for name, config in (("8b", base.LLAMA8B), ("small", base.QWEN06B)):
        if name not in which:
            continue
        model = base.make(base.LlamaConfig(**config))
        dt = base.gen(model, 1, 128, 256)
        base.emit(what="hf_dynamic_bs1", name=name, prompt=128, out=256, tok_s=256 / dt)
        if name == "8b":
            dt = base.gen(model, 32, 512, 256)
            base.emit(what="hf_dynamic_batch", name=name, bs=32, prompt=512, out=256, out_tok_s=32 * 256 / dt)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
