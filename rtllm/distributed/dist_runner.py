"""Runs each engine step on every rank: rank 0 schedules, the others follow.

Rank 0's :class:`DistributedRunner` wraps its :class:`~rtllm.runtime.model_runner.ModelRunner`.
For every step it assembles the inputs (the scheduler, KV manager and sampler live on
rank 0 only) and sends them to the world in two planes: the *control plane* (gloo, CPU
int64 tensors: a fixed 8-int header, then positions, query/context lengths, padded
block tables, logits rows and micro-batch bounds) and the *data plane* (the input ids,
which may hold device-resident tokens of the overlap loop; NCCL on GPUs). A follower
thus reads its command without synchronising its GPU and queues the step while the
previous one still runs. Every rank runs the same forward pass on its own shard and KV
cache; generation steps replay the rank's CUDA graphs (tensor parallelism; the graphs
hold the NCCL all-reduces). The last pipeline stage computes the (TP-gathered) logits;
if it is not rank 0 its tensor rank 0 sends them to rank 0, which samples. KV block
operations (copy-on-write, host-tier offload/onload) are broadcast the same way, so
every rank's cache holds the same blocks.

With pipeline parallelism a step is cut into up to ``pp_size`` micro-batches
(:mod:`rtllm.distributed.micro_batch`); sends do not wait, so stage ``s`` computes
micro-batch ``m`` while stage ``s + 1`` computes ``m - 1``.

Other ranks call :meth:`DistributedRunner.follow`, which executes commands until
rank 0 broadcasts shutdown. While rank 0 is idle it broadcasts a heartbeat every
``heartbeat_s`` so that followers, blocked in a collective with a bounded timeout,
never time out merely because no request came.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from rtllm.distributed import parallel_state as ps
from rtllm.distributed.mapping import Mapping
from rtllm.distributed.micro_batch import micro_batch_bounds, slice_step
from rtllm.layers.attention_backends import StepAttentionInputs
from rtllm.layers.parallel_linear import kv_head_range
from rtllm.models.config import ModelConfig
from rtllm.quantization.linear_method import needs_calibration
from rtllm.runtime.forward_context import ForwardContext, forward_context
from rtllm.runtime.model_runner import ModelRunner, StepInputs, TokenSources, apply_token_sources
from rtllm.runtime.transfer import to_device

logger = logging.getLogger(__name__)

CMD_STEP, CMD_COPY, CMD_OFFLOAD, CMD_ONLOAD, CMD_HEARTBEAT, CMD_SHUTDOWN = range(1, 7)
_HEADER = 8


def local_model_config(config: ModelConfig, mapping: Mapping) -> ModelConfig:
    """The shape of one rank's share: its query/KV heads and its stage's layers (what its
    KV cache holds and its memory plan counts)."""
    if mapping.world_size == 1:
        return config
    _, num_kv = kv_head_range(config.num_key_value_heads, mapping.tp_size, mapping.tp_rank)
    return replace(
        config,
        num_attention_heads=config.num_attention_heads // mapping.tp_size,
        num_key_value_heads=num_kv,
        num_hidden_layers=len(mapping.pp_layers(config.num_hidden_layers)),
    )


def check_parallel_support(args: Any, device: torch.device) -> None:
    """Raise ``NotImplementedError`` for what tensor/pipeline parallelism does not do yet."""
    if device.type == "cuda" and args.cuda_graph_config is not None and args.pipeline_parallel_size > 1:
        raise NotImplementedError(
            "CUDA graphs under pipeline parallelism are not supported yet (they are under tensor "
            "parallelism); pass cuda_graph_config=None with pipeline_parallel_size > 1"
        )
    quant = args.quant_config
    if quant is not None and needs_calibration(quant) and args.pipeline_parallel_size > 1:
        raise NotImplementedError(
            f"quant_algo={quant.quant_algo.name} calibrates on activations, which is not supported under "
            "pipeline parallelism yet (it is under tensor parallelism); quantize with `rtllm quantize` and "
            "load the result (each stage reads its layers), or use W8A16, W4A16 or FP8 with dynamic "
            "activation scales and fp8_weight_rounding='nearest'"
        )


def agree_num_blocks(num_blocks: int) -> int:
    """The KV pool size every rank can hold (block ids are shared across ranks)."""
    t = torch.tensor([num_blocks], dtype=torch.int64, device=ps.comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class DistributedRunner:
    """A :class:`ModelRunner` whose steps run on every rank (see the module docstring).

    Attributes not defined here (``device``, ``kv_caches``, ``allocate_host_cache``, ...)
    are the wrapped runner's.
    """

    def __init__(self, runner: ModelRunner, mapping: Mapping, heartbeat_s: float = 5.0) -> None:
        self.inner = runner
        self.mapping = mapping
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()  # one command (all of its collectives) at a time
        self._last_command = time.monotonic()
        self._stopped = threading.Event()
        self.broken: BaseException | None = None
        # Called once, with the error, when a collective fails (a peer is gone).
        self.on_failure: Callable[[BaseException], None] | None = None
        self._heartbeat: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # ---- rank 0 ----------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        """Rank 0: keep idle followers inside their collective timeout."""
        self._heartbeat = threading.Thread(target=self._beat, name="rtllm-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stopped.wait(self.heartbeat_s / 4):
            if time.monotonic() - self._last_command >= self.heartbeat_s and self.broken is None:
                try:
                    self._command(CMD_HEARTBEAT)
                except Exception:  # noqa: BLE001 - reported through on_failure
                    return

    def _command(self, cmd: int, *values: int, run: Callable[[], Any] | None = None) -> Any:
        if self.broken is not None:
            raise RuntimeError(f"the parallel group is broken: {self.broken}")
        with self._lock:
            try:
                header = torch.zeros(_HEADER, dtype=torch.int64)
                header[0] = cmd
                header[1 : 1 + len(values)] = torch.tensor(values, dtype=torch.int64)
                ps.control_broadcast(header)
                self._last_command = time.monotonic()
                return run() if run is not None else None
            except Exception as exc:
                self._fail(exc)
                raise

    def _fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
            logger.error("collective failed on rank %d: %r", self.mapping.rank, exc)
            if self.on_failure is not None:
                self.on_failure(exc)

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[Any],
        block_table_of: Callable[[int], list[int]],
        token_sources: TokenSources | None = None,
        prompt_logits: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Rank 0: one step on every rank; returns the logits rows rank 0 samples."""
        if prompt_logits is not None and any(item.request.sampling.needs_prompt_logits for item in scheduled):
            raise NotImplementedError(
                "prompt logprobs / context logits under tensor/pipeline parallelism are not supported yet"
            )
        step = self.inner.assemble(scheduled, block_table_of)
        ids = to_device(step.input_ids, torch.long, self.inner.device)
        if token_sources is not None:
            apply_token_sources(ids, token_sources)
        tables = step.attention.block_tables
        width = max(len(t) for t in tables)
        bounds = micro_batch_bounds(step.attention.query_lens, self.mapping.pp_size)
        payload = (
            step.positions + step.attention.query_lens + step.attention.context_lens
            + [b for t in tables for b in t + [-1] * (width - len(t))] + step.logits_indices + bounds
        )
        dims = (len(step.input_ids), len(tables), len(step.logits_indices), width, len(bounds))

        def run() -> torch.Tensor:
            ps.control_broadcast(torch.tensor(payload, dtype=torch.int64))
            ps.broadcast(ids.to(ps.comm_device()))
            return self._forward(step, ids, bounds)

        return self._command(CMD_STEP, *dims, run=run)

    def copy_block(self, src_block: int, dst_block: int) -> None:
        self._command(CMD_COPY, src_block, dst_block, run=lambda: self.inner.copy_block(src_block, dst_block))

    def offload(self, device_block: int, host_block: int) -> None:
        self._command(CMD_OFFLOAD, device_block, host_block, run=lambda: self.inner.offload(device_block, host_block))

    def onload(self, host_block: int, device_block: int) -> None:
        self._command(CMD_ONLOAD, host_block, device_block, run=lambda: self.inner.onload(host_block, device_block))

    def shutdown_followers(self) -> None:
        """Rank 0: tell the other ranks to leave :meth:`follow`."""
        self._stopped.set()
        if self.broken is None:
            try:
                self._command(CMD_SHUTDOWN)
            except Exception:  # noqa: BLE001 - followers already gone
                logger.warning("could not reach the other ranks at shutdown", exc_info=True)

    # ---- every rank --------------------------------------------------------------------
    def _forward(self, step: StepInputs, ids: torch.Tensor, bounds: list[int]) -> torch.Tensor | None:
        """Run ``step`` on this rank; rank 0 gets the logits rows it samples."""
        inner, mapping = self.inner, self.mapping
        graphs = inner.graphs  # captured under tensor parallelism only (pp_size == 1)
        if graphs is not None and step.is_generation_only and graphs.can_run(len(step.input_ids)):
            logits = graphs.run(step, None, input_ids=ids.to(inner.device))
            return logits if mapping.rank == 0 else None
        if len(bounds) == 2:  # one micro-batch (always without pipeline stages): no copies
            parts = [(step, 0, len(step.input_ids))]
        else:
            parts = [slice_step(step, first, end) for first, end in zip(bounds, bounds[1:], strict=False)]
        leader = (mapping.pp_size - 1) * mapping.tp_size  # the last stage's tensor rank 0
        rows: list[torch.Tensor] = []
        for part, token_start, token_end in parts:
            logits = self._forward_part(part, ids[token_start:token_end])
            if logits is not None and logits.shape[0] and mapping.rank == leader != 0:
                ps.send(logits, 0)
            if logits is not None:
                rows.append(logits)
        if mapping.rank == 0 and not mapping.is_last_pp_rank:
            vocab = inner.config.vocab_size
            rows = [
                ps.recv((len(part.logits_indices), vocab), torch.float32, leader).to(inner.device)
                for part, _, _ in parts
                if part.logits_indices
            ]
        ps.wait_sends()
        if mapping.rank != 0:
            return None
        if not rows:
            return torch.empty((0, inner.config.vocab_size), dtype=torch.float32, device=inner.device)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def _forward_part(self, step: StepInputs, ids: torch.Tensor) -> torch.Tensor | None:
        """One micro-batch through this rank's layers; logits on the last stage."""
        inner = self.inner
        pos = to_device(step.positions, torch.long, inner.device)
        metadata = inner.backend.build_metadata(step.attention)
        with forward_context(ForwardContext(inner.backend, metadata, inner.kv_caches)):
            hidden = inner.model(ids.to(inner.device), pos)
        if not self.mapping.is_last_pp_rank:
            return None
        num_rows = len(step.logits_indices)
        if not num_rows:
            return hidden.new_empty((0, inner.config.vocab_size), dtype=torch.float32)
        if num_rows < hidden.shape[0]:
            hidden = hidden.index_select(0, to_device(step.logits_indices, torch.long, inner.device))
        return inner.model.compute_logits(hidden).float()

    # ---- ranks > 0 ---------------------------------------------------------------------
    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks > 0: execute rank 0's commands until it broadcasts shutdown."""
        while True:
            header = ps.control_broadcast(torch.empty(_HEADER, dtype=torch.int64)).tolist()
            cmd, a, b = header[0], header[1], header[2]
            if cmd == CMD_SHUTDOWN:
                return
            if cmd == CMD_STEP:
                self._follow_step(*header[1:6])
            elif cmd == CMD_COPY:
                self.inner.copy_block(a, b)
            elif cmd == CMD_OFFLOAD:
                self.inner.offload(a, b)
            elif cmd == CMD_ONLOAD:
                self.inner.onload(a, b)
            elif cmd != CMD_HEARTBEAT:
                raise RuntimeError(f"unknown command {cmd} from rank 0")

    def _follow_step(self, num_tokens: int, num_seqs: int, num_rows: int, width: int, num_bounds: int) -> None:
        size = num_tokens + 2 * num_seqs + num_seqs * width + num_rows + num_bounds
        payload = ps.control_broadcast(torch.empty(size, dtype=torch.int64)).tolist()
        ids = ps.broadcast(torch.empty(num_tokens, dtype=torch.int64, device=ps.comm_device()))
        positions, rest = payload[:num_tokens], payload[num_tokens:]
        query_lens, context_lens = rest[:num_seqs], rest[num_seqs : 2 * num_seqs]
        flat = rest[2 * num_seqs : 2 * num_seqs + num_seqs * width]
        tables = [[x for x in flat[i * width : (i + 1) * width] if x >= 0] for i in range(num_seqs)]
        after_tables = 2 * num_seqs + num_seqs * width
        logits_indices = rest[after_tables : after_tables + num_rows]
        bounds = rest[after_tables + num_rows :]
        inner = self.inner
        inner._zero_new_blocks(max(max(t, default=0) for t in tables))
        attention = StepAttentionInputs(query_lens, context_lens, tables, inner.tokens_per_block, inner.device)
        # input_ids stays a placeholder list: the ids travel as a device tensor.
        step = StepInputs([0] * num_tokens, positions, attention, logits_indices)
        self._forward(step, ids, bounds)
