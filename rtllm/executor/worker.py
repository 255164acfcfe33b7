"""One worker process per rank: builds the rank's shard and runs (rank 0) or follows the engine.

Rank 0 runs an :class:`InProcessExecutor` (engine loop, scheduler, sampler, detokenizer,
stop strings) over a :class:`~rtllm.distributed.dist_runner.DistributedRunner`, and
serves the proxy over :mod:`rtllm.executor.ipc`: requests and aborts in, response
deltas out (batched by a sender thread, the only thread that writes to the socket).
Request ids are assigned by rank 0's executor in submission order; the proxy submits
one request at a time and mirrors that counter, so both sides use the same ids.

Log records of every rank go to the proxy through a multiprocessing queue, tagged with
the rank, and are re-emitted by the user's ``logging``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pickle
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from rtllm.distributed import parallel_state as ps
from rtllm.distributed.mapping import Mapping
from rtllm.executor import ipc
from rtllm.executor.result import GenerationResult, Response

logger = logging.getLogger(__name__)

#: Seconds between rank 0's reports of engine load and progress to the proxy.
STATS_INTERVAL_S = 0.5


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What every worker needs (picklable: it crosses the spawn)."""

    args: Any  # LlmArgs
    world_size: int
    tp_size: int
    pp_size: int
    init_method: str
    request_addr: str
    response_addr: str
    log_queue: Any
    parent_pid: int
    collective_timeout_s: float
    num_threads: int


class _RankTag(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def _setup_logging(rank: int, log_queue: Any) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.handlers.QueueHandler(log_queue)
    handler.addFilter(_RankTag(rank))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def worker_main(rank: int, cfg: WorkerConfig) -> None:
    """Entry point of rank ``rank`` (``torch.multiprocessing.start_processes``)."""
    _setup_logging(rank, cfg.log_queue)
    torch.set_num_threads(cfg.num_threads)
    torch.set_grad_enabled(False)
    mapping = Mapping(cfg.world_size, rank, cfg.tp_size, cfg.pp_size)
    args = cfg.args
    device = ps.rank_device(args.device, rank)
    channel = ipc.Channel(cfg.request_addr, cfg.response_addr, bind=False) if rank == 0 else None
    try:
        ps.init_distributed(mapping, device, cfg.init_method, cfg.collective_timeout_s)
        from rtllm.llmapi.build import build_engine

        built = build_engine(args, device)
        runner = built.engine.runner
        if rank == 0:
            _serve(built, runner, channel, cfg)
        else:
            runner.follow()
        logger.info("rank %d done", rank)
    except BaseException as exc:
        logger.error("rank %d failed: %s", rank, traceback.format_exc())
        if channel is not None:
            channel.send(["fatal", rank, f"{type(exc).__name__}: {exc}"])
        raise SystemExit(1) from exc
    finally:
        if channel is not None:
            channel.close()
        ps.destroy_distributed()


class _Sender:
    """Rank 0's only socket writer: drains a queue and sends responses in batches."""

    def __init__(self, channel: ipc.Channel) -> None:
        self.channel = channel
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.suppress_responses = False  # set when the parallel group broke
        self._thread = threading.Thread(target=self._run, name="rtllm-ipc-sender", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            while True:  # everything queued so far goes out together
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            batch: list[Any] = []
            for item in items:
                if item == "stop":
                    self._flush(batch)
                    return
                if item[0] == "resp":
                    if not self.suppress_responses:
                        batch.append(ipc.response_to_wire(item[1], item[2]))
                else:  # control messages keep their order relative to responses
                    batch = self._flush(batch)
                    self.channel.send(list(item))
            self._flush(batch)

    def _flush(self, batch: list[Any]) -> list[Any]:
        if batch:
            self.channel.send(["responses", batch])
        return []

    def stop(self) -> None:
        self.queue.put("stop")
        self._thread.join(timeout=10)


def _serve(built: Any, runner: Any, channel: ipc.Channel, cfg: WorkerConfig) -> None:
    from rtllm.executor.inproc_executor import InProcessExecutor

    sender = _Sender(channel)

    def forward(deliveries: list[tuple[GenerationResult, Response]]) -> None:
        # Every result in this process belongs to the proxy: its deltas are forwarded
        # by request id instead of being queued here.
        for result, response in deliveries:
            sender.queue.put(("resp", result.request_id, response))

    def on_failure(exc: BaseException) -> None:
        # A peer is gone: the proxy names it (it watches the processes); the engine's
        # per-request errors that follow would only say "connection closed".
        sender.suppress_responses = True
        sender.queue.put(("comm_failure", 0, f"{type(exc).__name__}: {exc}"))

    runner.on_failure = on_failure
    executor = InProcessExecutor(built.engine, built.tokenizer, built.end_ids, deliver=forward)
    runner.start_heartbeat()
    limits = built.engine.limits
    kv_cache = built.engine.kv_cache
    sender.queue.put((
        "ready",
        [limits.max_seq_len, limits.max_num_tokens, limits.vocab_size, int(limits.enable_chunked_prefill),
         limits.max_beam_width],
        kv_cache.num_blocks * kv_cache.tokens_per_block,
    ))
    next_stats = 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= next_stats:  # engine load and progress for the proxy's stats() and health
                next_stats = now + STATS_INTERVAL_S
                sender.queue.put(("stats", executor.stats(), now - executor.last_step_time))
            message = channel.recv(timeout_ms=200)
            if message is None:
                if os.getppid() != cfg.parent_pid:
                    logger.error("the user's process is gone; shutting down")
                    break
                continue
            kind = message[0]
            if kind == "submit":
                _submit(executor, message[1], message[2], sender)
            elif kind == "abort":
                executor.abort(message[1])
            elif kind == "shutdown":
                break
    finally:
        executor.shutdown()
        runner.shutdown_followers()
        sender.queue.put(("bye", 0, ""))
        sender.stop()


def _submit(executor: Any, expected_id: int, payload: bytes, sender: _Sender) -> None:
    try:
        request = pickle.loads(payload)
        result = executor.submit(request)
    except Exception as exc:  # noqa: BLE001 - reported to the caller of submit()
        kind = "value" if isinstance(exc, ValueError) else "not_implemented" if isinstance(
            exc, NotImplementedError) else "runtime"
        sender.queue.put(("ack", expected_id, kind, f"{exc}"))
        return
    if result.request_id != expected_id:  # the id invariant of this module's docstring
        logger.error("request id %d, proxy expected %d", result.request_id, expected_id)
    sender.queue.put(("ack", expected_id, None, ""))
