"""The proxy executor of a tensor/pipeline-parallel run: one worker process per rank.

The user's process holds :class:`MultiProcessExecutor`; ``world_size`` workers are
started with ``torch.multiprocessing`` (spawn, one node). Rank 0's worker runs the
engine (see :mod:`rtllm.executor.worker`); requests and response deltas cross the
ZeroMQ channel of :mod:`rtllm.executor.ipc`.

Faults never hang the caller: a watchdog thread polls the workers; when one exits
(crash, kill, OOM) every in-flight request fails with an error naming its rank, the
other workers are terminated and later submissions raise. Startup, submission
acknowledgements, collectives and shutdown all have bounded timeouts.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pickle
import queue
import shutil
import socket
import threading
import time
from typing import Any

import torch.multiprocessing as mp

from rtllm.engine.engine import EngineLimits, validate_request
from rtllm.executor import ipc
from rtllm.executor.executor import GenerationExecutor
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult, Response, push_responses
from rtllm.executor.worker import WorkerConfig, worker_main

logger = logging.getLogger(__name__)


class _Relay(logging.Handler):
    """Re-emits worker log records through this process's loggers."""

    def handle(self, record: logging.LogRecord) -> bool:
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does it
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiProcessExecutor(GenerationExecutor):
    """Proxy :class:`GenerationExecutor` over ``tp_size * pp_size`` worker processes."""

    kv_events = None
    iter_stats = None

    def __init__(
        self,
        args: Any,
        startup_timeout_s: float = 600.0,
        request_timeout_s: float = 60.0,
        collective_timeout_s: float = 120.0,
    ) -> None:
        if args.kv_cache_config.event_buffer_max_size or args.enable_iter_perf_stats:
            raise NotImplementedError(
                "KV cache events and iteration stats are not forwarded from parallel workers yet"
            )
        from rtllm.distributed.dist_runner import check_parallel_support
        from rtllm.distributed.parallel_state import rank_device

        # Refuse what the workers would refuse, before starting them.
        check_parallel_support(args, rank_device(args.device))
        self.tp_size = args.tensor_parallel_size
        self.pp_size = args.pipeline_parallel_size
        self.world_size = self.tp_size * self.pp_size
        self.request_timeout_s = request_timeout_s
        self._results: dict[int, GenerationResult] = {}
        self._acks: dict[int, list[Any]] = {}
        self._cond = threading.Condition()
        self._submit_lock = threading.Lock()
        self._next_id = 0  # mirrors rank 0's executor ids (see rtllm.executor.worker)
        self._dead: str | None = None
        self._ready = False
        # Reported by rank 0: its limits and KV pool (at start), load and progress.
        self._limits: EngineLimits | None = None
        self._pool_tokens = 0
        self._stats: dict[str, int] = {}
        self.last_step_time = time.monotonic()
        self._closed = False
        ctx = mp.get_context("spawn")
        # Only workers write to this queue; its reader is a daemon thread never joined, so a
        # worker killed mid-write cannot block this process (no QueueListener.stop()).
        self._log_queue = ctx.Queue()
        self._log_queue.cancel_join_thread()
        self._log_stop = threading.Event()
        threading.Thread(target=self._log_loop, name="rtllm-worker-logs", daemon=True).start()
        request_addr, response_addr, self._tmpdir = ipc.new_addresses()
        self._channel = ipc.Channel(request_addr, response_addr, bind=True)
        cfg = WorkerConfig(
            args, self.world_size, self.tp_size, self.pp_size, f"tcp://127.0.0.1:{_free_port()}",
            request_addr, response_addr, self._log_queue, os.getpid(), collective_timeout_s,
            max(1, (os.cpu_count() or 1) // self.world_size),
        )
        self._context = mp.start_processes(
            worker_main, args=(cfg,), nprocs=self.world_size, join=False, daemon=True, start_method="spawn"
        )
        self.processes = list(self._context.processes)
        self._receiver = threading.Thread(target=self._receive_loop, name="rtllm-proxy", daemon=True)
        self._receiver.start()
        deadline = time.monotonic() + startup_timeout_s
        with self._cond:
            while not self._ready and self._dead is None:
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    self._dead = f"the workers did not start within {startup_timeout_s} s"
        if self._dead is not None:
            message = self._dead
            self.shutdown()
            raise RuntimeError(f"parallel workers failed to start: {message}")
        logger.info("%d workers ready (tp=%d, pp=%d)", self.world_size, self.tp_size, self.pp_size)

    @property
    def worker_pids(self) -> list[int]:
        """Process id of each rank's worker."""
        return [p.pid for p in self.processes]

    # ---- engine state, as rank 0 reports it ---------------------------------------------
    @property
    def limits(self) -> EngineLimits:
        if self._limits is None:
            raise RuntimeError("the parallel workers have not started")
        return self._limits

    def validate(self, prompt_token_ids: list[int], max_tokens: int, beam_width: int = 1) -> None:
        validate_request(self.limits, self._pool_tokens, prompt_token_ids, max_tokens, beam_width)

    @property
    def is_alive(self) -> bool:
        return self._ready and self._dead is None and not self._closed

    @property
    def failure(self) -> str | None:
        return self._dead

    @property
    def has_work(self) -> bool:
        return bool(self._results)

    def stats(self) -> dict[str, int]:
        """Rank 0's last report (at most ``STATS_INTERVAL_S`` old)."""
        return dict(self._stats)

    # ---- caller side -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationResult:
        params = request.sampling_params
        if params.prompt_logprobs is not None or params.return_context_logits:
            raise NotImplementedError(
                "prompt_logprobs / return_context_logits under tensor/pipeline parallelism are not supported yet"
            )
        payload = pickle.dumps(request)
        with self._submit_lock:
            self._raise_if_dead()
            request_id = self._next_id
            request.request_id = request_id
            result = GenerationResult(request_id, request.prompt, request.prompt_token_ids, self.abort)
            with self._cond:
                self._results[request_id] = result  # before sending: deltas may beat the ack
            self._channel.send(["submit", request_id, payload])
            ack = self._wait_ack(request_id)
            if ack[0] is not None:
                with self._cond:
                    self._results.pop(request_id, None)
                error = {"value": ValueError, "not_implemented": NotImplementedError}.get(ack[0], RuntimeError)
                raise error(ack[1])
            self._next_id += 1
        return result

    def _wait_ack(self, request_id: int) -> list[Any]:
        deadline = time.monotonic() + self.request_timeout_s
        with self._cond:
            while request_id not in self._acks:
                if self._dead is not None:
                    self._results.pop(request_id, None)
                    raise RuntimeError(self._dead)
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    self._results.pop(request_id, None)
                    raise TimeoutError(f"rank 0 did not acknowledge request {request_id} in {self.request_timeout_s} s")
            return self._acks.pop(request_id)

    def _raise_if_dead(self) -> None:
        if self._closed:
            raise RuntimeError("the executor has been shut down")
        if self._dead is not None:
            raise RuntimeError(f"the parallel workers failed: {self._dead}")

    def abort(self, request_id: int) -> None:
        if self._dead is None and not self._closed:
            self._channel.send(["abort", request_id])

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the workers (gracefully, then by force after ``timeout_s``); unfinished
        requests finish as cancelled."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if self._dead is None and self._ready:
            try:
                self._channel.send(["shutdown"])
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
        self._kill_workers()
        self._receiver.join(timeout=5)
        self._fail_all("the executor was shut down", reason="cancelled")
        if not self._receiver.is_alive():  # never close a socket another thread polls
            self._channel.close()
        self._log_stop.set()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _log_loop(self) -> None:
        relay = _Relay()
        while not self._log_stop.is_set():
            try:
                record = self._log_queue.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError, ValueError):
                return
            relay.handle(record)

    # ---- receiver / watchdog thread -------------------------------------------------------
    def _receive_loop(self) -> None:
        comm_failure_at: float | None = None
        while True:
            dead = self._dead_worker()
            if dead is not None and (self._dead is None and not self._closed):
                self._on_fault(dead)
            if self._closed:
                return
            if comm_failure_at is not None and time.monotonic() - comm_failure_at > 10 and self._dead is None:
                self._on_fault("rank 0: a collective failed but no worker exited")
            message = self._channel.recv(timeout_ms=100)
            if message is None:
                continue
            kind = message[0]
            if kind == "responses":
                deliveries: list[tuple[GenerationResult, Response]] = []
                with self._cond:
                    results = self._results
                    for item in message[1]:
                        request_id, response = ipc.response_from_wire(item)
                        result = results.get(request_id)
                        if result is None:
                            continue
                        done = response.finished if response.request_finished is None else response.request_finished
                        if done:
                            results.pop(request_id, None)
                        deliveries.append((result, response))
                    push_responses(deliveries)
            elif kind == "ack":
                with self._cond:
                    self._acks[message[1]] = [message[2], message[3]]
                    self._cond.notify_all()
            elif kind == "stats":
                self._stats = message[1]
                self.last_step_time = time.monotonic() - message[2]
            elif kind == "ready":
                with self._cond:
                    self._limits = EngineLimits(*message[1][:3], bool(message[1][3]), message[1][4])
                    self._pool_tokens = message[2]
                    self._ready = True
                    self._cond.notify_all()
            elif kind == "fatal":
                self._on_fault(f"rank {message[1]} failed: {message[2]}")
            elif kind == "comm_failure":
                # A peer died mid-collective: wait (bounded) for the watchdog to name it.
                comm_failure_at = time.monotonic()

    def _dead_worker(self) -> str | None:
        for rank, process in enumerate(self.processes):
            if process.exitcode is not None and (process.exitcode != 0 or not self._closed):
                return f"worker rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
        return None

    def _on_fault(self, message: str) -> None:
        logger.error("parallel run failed: %s", message)
        with self._cond:
            self._dead = message
            self._cond.notify_all()
        self._fail_all(message, reason="error")
        self._kill_workers()

    def _fail_all(self, message: str, reason: str) -> None:
        with self._cond:
            results, self._results = self._results, {}
        for result in results.values():
            error = message if reason == "error" else None
            result._push(Response([], finished=True, finish_reason=reason, error=error, request_finished=True))

    def _kill_workers(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)

