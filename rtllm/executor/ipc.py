"""The channel between the user's process (proxy) and rank 0's worker: ZeroMQ + msgpack.

Two PUSH/PULL sockets over ``ipc://`` (the proxy binds, the worker connects): one for
requests, one for responses. Every message is a msgpack array encoded by ``msgspec``.
Responses travel as flat arrays (``[request_id, token_ids, text, finished, ...]``),
many per message, so the per-token hot path never pickles Python objects; only the rare
heavy extras (logprob dicts, logits tensors) and the request itself (sent once; its
``SamplingParams`` may hold callables or tensors) are pickled.

ZeroMQ sockets are not thread-safe: each side sends from one thread only.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any

import msgspec
import zmq

from rtllm.executor.result import Response

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()

_EXTRAS = ("logprobs", "generation_logits", "prompt_logprobs", "context_logits")


def new_addresses() -> tuple[str, str, str]:
    """``(request_addr, response_addr, tmpdir)`` for a fresh pair of ipc sockets."""
    tmpdir = tempfile.mkdtemp(prefix="rtllm-ipc-")
    return f"ipc://{os.path.join(tmpdir, 'req')}", f"ipc://{os.path.join(tmpdir, 'resp')}", tmpdir


def encode(message: list[Any]) -> bytes:
    return _ENCODER.encode(message)


def decode(data: bytes) -> list[Any]:
    return _DECODER.decode(data)


def response_to_wire(request_id: int, r: Response) -> list[Any]:
    """A flat msgpack-able array for one response."""
    extras = {name: getattr(r, name) for name in _EXTRAS if getattr(r, name) is not None}
    return [
        request_id, r.token_ids, r.text, r.finished, r.finish_reason, r.stop_reason, r.error,
        r.index, r.request_finished, r.cumulative_logprob, pickle.dumps(extras) if extras else None,
    ]


def response_from_wire(item: list[Any]) -> tuple[int, Response]:
    (request_id, tokens, text, finished, reason, stop_reason, error, index, request_finished,
     cumulative, extras) = item
    response = Response(
        tokens, text, finished, reason, stop_reason, error, index,
        cumulative_logprob=cumulative, request_finished=request_finished,
    )
    if extras is not None:
        for name, value in pickle.loads(extras).items():
            setattr(response, name, value)
    return request_id, response


class Channel:
    """One side of the request/response socket pair."""

    def __init__(self, request_addr: str, response_addr: str, *, bind: bool) -> None:
        self._ctx = zmq.Context()
        if bind:  # the proxy: sends requests, receives responses
            self._out = self._ctx.socket(zmq.PUSH)
            self._in = self._ctx.socket(zmq.PULL)
            self._out.bind(request_addr)
            self._in.bind(response_addr)
        else:  # rank 0's worker
            self._out = self._ctx.socket(zmq.PUSH)
            self._in = self._ctx.socket(zmq.PULL)
            self._out.connect(response_addr)
            self._in.connect(request_addr)
        for sock in (self._out, self._in):
            sock.setsockopt(zmq.LINGER, 1000)  # bounded close

    def send(self, message: list[Any]) -> None:
        self._out.send(encode(message))

    def recv(self, timeout_ms: int) -> list[Any] | None:
        """The next message, or None after ``timeout_ms`` without one."""
        if not self._in.poll(timeout_ms):
            return None
        return decode(self._in.recv())

    def close(self) -> None:
        self._out.close()
        self._in.close()
        self._ctx.term()
